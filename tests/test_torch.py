"""quickcupy.torch: QuickLinear and load_causal_lm (PyTorch and transformers without AutoAWQ).

CPU: importing quickcupy (its library, its tools) never imports torch or transformers; quickcupy.torch
without torch names what to install; which checkpoint tensors are 4-bit layers (quickcupy.formats.layers).
GPU: QuickLinear against the float64 reference (fp16 and bf16, bias, act-order, Llama-7B shapes,
leading dimensions) into a poisoned output, its argument rules, a torch CUDA-graph capture; tiny
checkpoints (AutoAWQ Llama, GPTQ act-order Qwen2 with q/k/v biases) loaded with load_causal_lm
against transformers' own model on the dequantized weights in float32: logits, 32 greedy tokens
of generate, and the whole forward captured in a CUDA graph.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import rel_error
from quickcupy import quantize, reference_gemm
from quickcupy.formats.layers import quantized_prefixes, split_names
from quickcupy.llama import NORMS, PROJECTIONS, LlamaConfig, random_head, random_layers, save_awq_checkpoint
from quickcupy.llama.checkpoint import EMBED, FINAL_NORM, TensorStore

ROOT = Path(__file__).resolve().parents[1]
TINY = LlamaConfig.preset("tiny")      # hidden 256, intermediate 512, 4 heads / 2 KV heads, 2 layers
VOCAB = 512
TOL = {"float16": 1e-2, "bfloat16": 1e-2}          # one GEMM against float64
MODEL_TOL = {"float16": 5e-3, "bfloat16": 4e-2}    # the whole model in 16 bits against float32


# ------------------------------------------------------------------------------------------- CPU
def test_importing_quickcupy_imports_neither_torch_nor_transformers(tmp_path):
    """Stand-in torch and transformers packages lead the path: the library, its formats, the
    Llama runner and every tool import without touching them (they are importable, so any
    import would have found them)."""
    for name in ("torch", "transformers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    script = textwrap.dedent("""
        import sys
        import quickcupy, quickcupy.gemm, quickcupy.formats, quickcupy.formats.layers, quickcupy.llama
        import quickcupy.__main__
        found = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not found, found
        import torch, transformers
        assert torch.__file__.startswith(sys.argv[1]), torch.__file__
    """)
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": path}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_quickcupy_torch_without_torch_names_the_package():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    with pytest.raises(ImportError, match="quickcupy.torch needs PyTorch, which quickcupy does not install"):
        importlib.import_module("quickcupy.torch")


def test_quantized_prefixes_by_name():
    names = ["model.embed_tokens.weight",
             "model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.qzeros",
             "model.layers.0.self_attn.q_proj.scales", "model.layers.0.self_attn.q_proj.g_idx",
             "model.layers.0.self_attn.q_proj.bias",
             "model.layers.0.mlp.down_proj.weight_packed", "model.layers.0.mlp.down_proj.weight_scale",
             "model.layers.0.mlp.down_proj.weight_shape",
             "model.layers.0.mlp.up_proj.weight",               # left unquantized: a float layer
             "model.layers.0.mlp.up_proj.scales",               # no qweight beside it: not a 4-bit layer
             "model.layers.0.self_attn.q_proj.inner.weight",    # a child module's, not the layer's own
             "qweight", "lm_head.qweight", "lm_head.qzeros", "lm_head.scales"]
    prefixes, plain = split_names(names)
    assert prefixes == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    assert quantized_prefixes(names) == prefixes
    assert plain == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                     "model.layers.0.mlp.up_proj.scales", "model.layers.0.self_attn.q_proj.inner.weight", "qweight"]


@pytest.mark.parametrize("head", ["float", "4-bit", "tied"])
def test_a_checkpoint_splits_into_its_4bit_layers_and_the_rest(head, rng, tmp_path):
    pytest.importorskip("safetensors")
    _awq_checkpoint(tmp_path, rng, head)
    prefixes, plain = split_names(TensorStore(tmp_path))
    layers = [f"model.layers.{i}.{PROJECTIONS[p]}.{p}" for i in range(TINY.num_hidden_layers) for p in PROJECTIONS]
    assert sorted(prefixes) == sorted(layers + (["lm_head"] if head == "4-bit" else []))
    norms = [f"model.layers.{i}.{n}.weight" for i in range(TINY.num_hidden_layers) for n in NORMS]
    assert sorted(plain) == sorted(norms + [EMBED, FINAL_NORM] + (["lm_head.weight"] if head == "float" else []))


# ------------------------------------------------------------------------------------------ data
def _awq_checkpoint(path, rng, head="float", std=0.02, permuted_head=False):
    """A tiny AutoAWQ Llama (group 64) with an embedding and a float, 4-bit or tied LM head.
    permuted_head: the LM head maps each token's embedding to a permuted token, over blocks of
    weights ``std``, which leaves top-2 logit gaps far above 16-bit rounding (greedy tokens that
    cannot flip). Returns (quantized layers, head) as written."""
    seed = int(rng.integers(2**31))
    layers = [w.quantized(64) for w in random_layers(TINY, seed=seed, std=std)]
    h = random_head(TINY, VOCAB, seed + 1)
    if permuted_head:
        h.lm_head = h.embed_tokens.astype(np.float32)[rng.permutation(VOCAB)]
    if head == "4-bit":
        h.lm_head = quantize(h.lm_head, 64)
    elif head == "tied":
        h.lm_head = None
    save_awq_checkpoint(path, TINY, layers, group_size=64, head=h)
    return layers, h


def _awq_state(layers, head) -> dict:
    """Hugging Face names -> float32 weights of the checkpoint as written (dequantized, float16-rounded)."""
    state = {EMBED: head.embed_tokens, FINAL_NORM: head.norm}
    if head.lm_head is not None:
        state["lm_head.weight"] = (head.lm_head.dequantize() if hasattr(head.lm_head, "dequantize")
                                   else np.asarray(head.lm_head, np.float16))
    for i, w in enumerate(layers):
        for name, q in w.projections().items():
            state[f"model.layers.{i}.{PROJECTIONS[name]}.{name}.weight"] = q.dequantize(np.float32)
        for name in NORMS:
            state[f"model.layers.{i}.{name}.weight"] = getattr(w, name)
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _reference(path, state, torch):
    """transformers' own model of the checkpoint's config.json (quantization_config removed), in
    float32 on the GPU with ``state``'s weights; the only key it may lack is a tied lm_head."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(str(path))
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config).float()   # config.json says float16
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if missing:
        model.tie_weights()
    return model.to("cuda").eval()


def _qwen2_gptq_checkpoint(path, rng, G=64):
    """A tiny Qwen2 (q/k/v with biases) as a GPTQ act-order checkpoint (classic format, zeros stored
    minus one), written with the format test's independent writer; returns the float32 state of
    the same weights for transformers, in the checkpoint's column order."""
    from safetensors.numpy import save_file
    from writers import dequantize, write_gptq
    H, I, nh, nkv, L = 256, 512, 4, 2, 2
    d = H // nh
    shapes = {"q_proj": (nh * d, H), "k_proj": (nkv * d, H), "v_proj": (nkv * d, H), "o_proj": (H, nh * d),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    tensors, state = {}, {}
    for i in range(L):
        for name, (N, K) in shapes.items():
            prefix = f"model.layers.{i}.{PROJECTIONS[name]}.{name}"
            codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
            zeros = rng.integers(5, 11, (N, K // G), dtype=np.uint8)
            scales = rng.uniform(0.002, 0.006, (N, K // G)).astype(np.float16)
            g_idx = np.empty(K, np.int64)
            g_idx[rng.permutation(K)] = np.arange(K) // G           # desc_act: groups scattered over K
            for part, a in write_gptq(codes, zeros, scales, g_idx).items():
                tensors[f"{prefix}.{part}"] = np.ascontiguousarray(a)    # safetensors writes the buffer as laid out
            state[f"{prefix}.weight"] = dequantize(codes, zeros, scales, g_idx)
            if name in ("q_proj", "k_proj", "v_proj"):
                tensors[f"{prefix}.bias"] = (0.1 * rng.standard_normal(N)).astype(np.float16)
                state[f"{prefix}.bias"] = tensors[f"{prefix}.bias"]
        for name in NORMS:
            state[f"model.layers.{i}.{name}.weight"] = (1 + 0.05 * rng.standard_normal(H)).astype(np.float16)
    state[EMBED] = (0.02 * rng.standard_normal((VOCAB, H))).astype(np.float16)
    state[FINAL_NORM] = (1 + 0.05 * rng.standard_normal(H)).astype(np.float16)
    state["lm_head.weight"] = (0.02 * rng.standard_normal((VOCAB, H))).astype(np.float16)
    tensors.update({name: a for name, a in state.items() if a.dtype == np.float16 and name not in tensors})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": H,
              "intermediate_size": I, "num_attention_heads": nh, "num_key_value_heads": nkv,
              "num_hidden_layers": L, "vocab_size": VOCAB, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "use_sliding_window": False,
              "hidden_act": "silu", "torch_dtype": "float16",
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": True,
                                      "sym": False, "checkpoint_format": "gptq"}}
    (path / "config.json").write_text(json.dumps(config))
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _torch_modules():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    qt = importlib.import_module("quickcupy.torch")
    return torch, qt


def _poisoned_outputs(monkeypatch, qt, torch):
    """QuickLinear's output buffers filled with NaN (an element the kernel leaves unwritten fails);
    returns the list of buffers handed out."""
    given = []

    def nan_output(shape, like):
        given.append(torch.full(shape, float("nan"), dtype=like.dtype, device=like.device))
        return given[-1]
    monkeypatch.setattr(qt, "_output", nan_output)
    return given


def _x(rng, shape, dtype, torch):
    """Random (..., K) activations on the GPU and their exact float64 values."""
    t = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to("cuda", getattr(torch, dtype))
    return t, t.double().cpu().numpy()


# ------------------------------------------------------------------------------------ QuickLinear
LINEAR_CASES = [  # K, N, G, leading dims of x, bias, act-order
    (256, 128, 64, (2, 3), True, False),
    (512, 256, 128, (5,), True, True),
    (4096, 11008, 128, (1,), False, False),       # Llama-2-7B gate_proj / up_proj
    (11008, 4096, 128, (2, 3), True, True),       # down_proj, act-order
    (4096, 12288, 128, (16,), False, False),      # q|k|v fused
    (4096, 4096, 128, (33,), True, False),
    (1024, 512, -1, (64,), False, True),          # one group per row
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("K,N,G,lead,bias,act_order", LINEAR_CASES)
def test_quick_linear_matches_float64(K, N, G, lead, bias, act_order, dtype, rng, monkeypatch):
    torch, qt = _torch_modules()
    q = quantize((0.05 * rng.standard_normal((N, K))).astype(np.float32), G)
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).to("cuda", getattr(torch, dtype)) if bias else None
    perm = rng.permutation(K) if act_order else None
    linear = qt.QuickLinear.from_quantized(q, bias=b, perm=None if perm is None else torch.from_numpy(perm))
    assert (linear.in_features, linear.out_features, linear.kernel) == (K, N, "auto")
    x, x64 = _x(rng, (*lead, K), dtype, torch)
    given = _poisoned_outputs(monkeypatch, qt, torch)
    with torch.no_grad():
        y = linear(x)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.shape == (*lead, N)
    assert len(given) == 1 and y.data_ptr() == given[0].data_ptr()         # written into the poisoned buffer
    ref = reference_gemm(x64 if perm is None else x64[..., perm], q, None if b is None else b.double().cpu().numpy())
    assert rel_error(y.double().cpu().numpy(), ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["quick", "quick_decode", "dequant", "awq"])
def test_quick_linear_named_kernels(kernel, rng):
    """A named kernel packs the layer in the layout it reads and runs it; a kernel of the other
    layout is refused when set."""
    torch, qt = _torch_modules()
    q = quantize((0.05 * rng.standard_normal((256, 512))).astype(np.float32), 128)
    linear = qt.QuickLinear.from_quantized(q, kernel=kernel)
    x, x64 = _x(rng, (3, 512), "float16", torch)
    with torch.no_grad():
        assert rel_error(linear(x).double().cpu().numpy(), reference_gemm(x64, q)) < TOL["float16"]
    assert f"kernel={kernel!r}" in repr(linear) and "in_features=512, out_features=256" in repr(linear)
    other = "quick" if kernel == "awq" else "awq"
    with pytest.raises(ValueError, match=f"kernel='{other}' reads the {other} layout"):
        linear.kernel = other


@pytest.mark.gpu
def test_quick_linear_inputs(rng):
    """Views that are not C-contiguous or not 16-byte aligned are copied; an empty batch gives an
    empty output; wrong dtype, device, width or a tensor that needs a gradient are refused."""
    torch, qt = _torch_modules()
    q = quantize((0.05 * rng.standard_normal((128, 256))).astype(np.float32), 64)
    linear = qt.QuickLinear.from_quantized(q)
    x, x64 = _x(rng, (256, 6), "float16", torch)
    with torch.no_grad():
        y = linear(x.t())                                       # (6, 256), not contiguous
        assert rel_error(y.double().cpu().numpy(), reference_gemm(x64.T, q)) < TOL["float16"]
        flat = torch.empty(6 * 256 + 1, dtype=torch.float16, device="cuda")
        shifted = flat[1:].view(6, 256)                         # 2 bytes past an aligned address
        shifted.copy_(x.t())
        assert shifted.data_ptr() % 16
        assert rel_error(linear(shifted).double().cpu().numpy(), reference_gemm(x64.T, q)) < TOL["float16"]
        assert linear(torch.empty(0, 4, 256, dtype=torch.float16, device="cuda")).shape == (0, 4, 128)
        with pytest.raises(TypeError, match="x must be float16 or bfloat16, got torch.float32"):
            linear(x.t().float())
        with pytest.raises(TypeError, match="x must be a CUDA tensor"):
            linear(x.t().cpu())
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 256\)"):
            linear(x)
    with pytest.raises(RuntimeError, match="QuickLinear computes no gradients"):
        linear(x.t().clone().requires_grad_())


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64])
def test_quick_linear_chain_in_a_torch_cuda_graph(M, rng):
    """Two QuickLinears (the first act-order) around a torch op, captured as PyTorch's
    documentation writes it (warm-up on a side stream, then ``torch.cuda.graph``): replays with
    new inputs give the reference; the intermediate and the output live in the graph's pool."""
    torch, qt = _torch_modules()
    q1 = quantize((0.05 * rng.standard_normal((512, 1024))).astype(np.float32), 128)
    q2 = quantize((0.05 * rng.standard_normal((256, 512))).astype(np.float32), 128)
    perm = rng.permutation(1024)
    lin1 = qt.QuickLinear.from_quantized(q1, perm=perm)
    lin2 = qt.QuickLinear.from_quantized(q2, bias=rng.standard_normal(256).astype(np.float16))
    x = torch.zeros(M, 1024, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            lin2(torch.relu(lin1(x)))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = lin2(torch.relu(lin1(x)))
    for _ in range(2):
        x_host = rng.standard_normal((M, 1024)).astype(np.float16)
        x.copy_(torch.from_numpy(x_host))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        h = np.maximum(reference_gemm(x_host[:, perm], q1).astype(np.float16), 0)
        ref = reference_gemm(h, q2, lin2.layer.bias.get())
        assert rel_error(y.double().cpu().numpy(), ref) < TOL["float16"]


# ---------------------------------------------------------------------------------- load_causal_lm
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head", ["float", "4-bit", "tied"])
def test_load_causal_lm_awq_logits_match_transformers(head, dtype, rng, tmp_path):
    torch, qt = _torch_modules()
    layers, h = _awq_checkpoint(tmp_path, rng, head)
    model = qt.load_causal_lm(tmp_path, dtype=getattr(torch, dtype))
    quick = [n for n, m in model.named_modules() if isinstance(m, qt.QuickLinear)]
    assert len(quick) == 7 * TINY.num_hidden_layers + (head == "4-bit")
    assert not model.training and "quantization_config" not in model.config.to_dict()
    for name, p in model.named_parameters():
        assert p.device.type == "cuda" and p.dtype == getattr(torch, dtype) and not p.requires_grad, name
    if head == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = _reference(tmp_path, _awq_state(layers, h), torch)
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    ref_inv_freq = [b for n, b in reference.named_buffers() if n.endswith("inv_freq")]
    assert len(inv_freq) == len(ref_inv_freq) >= 1
    for a, b in zip(inv_freq, ref_inv_freq):
        assert a.device.type == "cuda" and torch.allclose(a, b, rtol=1e-6, atol=0)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (2, 12))).to("cuda")
    with torch.no_grad():
        got = model(ids).logits
        ref = reference(ids).logits
    assert got.dtype == getattr(torch, dtype)
    assert rel_error(got.double().cpu().numpy(), ref.double().cpu().numpy()) < MODEL_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_load_causal_lm_gptq_act_order_qwen2_with_biases(dtype, rng, tmp_path):
    """Another family and format through the same loader: Qwen2 (q/k/v biases, read into the
    QuickLinears) from a GPTQ act-order checkpoint."""
    torch, qt = _torch_modules()
    state = _qwen2_gptq_checkpoint(tmp_path, rng)
    model = qt.load_causal_lm(tmp_path, dtype=dtype)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, qt.QuickLinear) and q_proj.layer.perm is not None and q_proj.layer.bias is not None
    reference = _reference(tmp_path, state, torch)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (2, 10))).to("cuda")
    with torch.no_grad():
        got, ref = model(ids).logits, reference(ids).logits
    assert rel_error(got.double().cpu().numpy(), ref.double().cpu().numpy()) < MODEL_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_load_causal_lm_greedy_generate_equals_transformers(dtype, rng, tmp_path):
    """32 greedy tokens of transformers' generate on the loaded model equal the float32 reference's.
    The weights leave large top-2 gaps (see _awq_checkpoint), checked on the reference's scores so
    that an equal-token check cannot hinge on a near-tie."""
    torch, qt = _torch_modules()
    layers, h = _awq_checkpoint(tmp_path, rng, std=0.01, permuted_head=True)
    model = qt.load_causal_lm(tmp_path, dtype=dtype)
    reference = _reference(tmp_path, _awq_state(layers, h), torch)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (2, 8))).to("cuda")
    settings = dict(max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = reference.generate(ids, output_scores=True, return_dict_in_generate=True, **settings)
        got = model.generate(ids, **settings)
    for step, scores in enumerate(ref.scores):
        top2 = scores.float().topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]) / scores.float().std(dim=-1)
        assert float(gap.min()) > 0.5, f"step {step}: a near-tie in the reference ({float(gap.min()):.3f} std)"
    np.testing.assert_array_equal(got.cpu().numpy(), ref.sequences.cpu().numpy())


def _capture(model, ids, torch):
    """model(ids).logits captured in a CUDA graph after a side-stream warm-up; returns (graph, logits)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            model(ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        logits = model(ids, use_cache=False).logits
    return graph, logits


@pytest.mark.gpu
def test_load_causal_lm_forward_in_a_torch_cuda_graph(rng, tmp_path):
    """The loaded model's whole forward captured by torch.cuda.graph replays new token ids to the
    reference's logits. transformers' own model is captured first: where its forward cannot be
    captured in this version, the test says so and skips."""
    torch, qt = _torch_modules()
    layers, h = _awq_checkpoint(tmp_path, rng)
    model = qt.load_causal_lm(tmp_path)
    reference = _reference(tmp_path, _awq_state(layers, h), torch)
    ids = torch.zeros(1, 8, dtype=torch.int64, device="cuda")
    try:
        _capture(reference, ids, torch)
    except RuntimeError as exc:
        pytest.skip(f"transformers' own forward cannot be captured here: {exc}")
    graph, logits = _capture(model, ids, torch)
    for _ in range(2):
        ids.copy_(torch.from_numpy(rng.integers(0, VOCAB, (1, 8))))
        logits.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            ref = reference(ids, use_cache=False).logits
        assert rel_error(logits.double().cpu().numpy(), ref.double().cpu().numpy()) < MODEL_TOL["float16"]


@pytest.mark.gpu
def test_load_causal_lm_refusals(rng, tmp_path):
    """What cannot be served is named: no config.json, no quantization_config, no 4-bit layer,
    a 16-bit dtype that is not one, a device that is not CUDA, a tensor the model needs."""
    torch, qt = _torch_modules()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        qt.load_causal_lm(tmp_path)
    _awq_checkpoint(tmp_path, rng)
    with pytest.raises(ValueError, match="the 4-bit kernels take float16 or bfloat16"):
        qt.load_causal_lm(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="run on CUDA devices only"):
        qt.load_causal_lm(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="kernel='fastest' is unknown"):
        qt.load_causal_lm(tmp_path, kernel="fastest")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    with pytest.raises(ValueError, match="has no quantization_config"):
        qt.load_causal_lm(tmp_path)
    from safetensors.numpy import load_file, save_file
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.input_layernorm.weight"},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensor.* model.layers.1.input_layernorm.weight"):
        qt.load_causal_lm(tmp_path)
    save_file({k: v for k, v in tensors.items() if not k.endswith(".qweight")},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="holds no 4-bit layer"):
        qt.load_causal_lm(tmp_path)
