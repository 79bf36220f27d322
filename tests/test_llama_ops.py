"""GPU: the fused Llama ops (cuda/llama_ops.cu) against float64 NumPy, the CUDA-graph decode step
against eager decode (bit for bit), and the whole model against Hugging Face transformers."""
import numpy as np
import pytest

from conftest import rel_error
from quickcupy.llama import LlamaConfig, LlamaModel, random_head, random_layers, rope_tables
from quickcupy.llama.model import DecodeGraph

pytestmark = pytest.mark.gpu

TINY = LlamaConfig.preset("tiny")       # GQA (4 heads, 2 KV heads), head_dim 64


def _seed(rng):
    return int(rng.integers(2**31))


def _half(cupy, rng, shape, scale=1.0):
    return cupy.asarray((scale * rng.standard_normal(shape)).astype(np.float16))


def _poisoned(cupy, shape, dtype=np.float16):
    return cupy.full(shape, np.nan, dtype)


# ---------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("rows,H", [(1, 4096), (3, 5120), (17, 100), (2, 1), (5, 257)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm(rng, rows, H, with_delta):
    import cupy
    from quickcupy.llama import ops
    x, w = _half(cupy, rng, (rows, H), 3.0), _half(cupy, rng, (H,))
    delta = _half(cupy, rng, (rows, H)) if with_delta else None
    x0 = x.get().astype(np.float64)
    s = x0 if delta is None else (x0 + delta.get()).astype(np.float16).astype(np.float64)
    out = ops.add_rms_norm(x, w, 1e-5, delta, out=_poisoned(cupy, (rows, H)))
    # The residual stream is x + delta rounded once to float16, exactly.
    np.testing.assert_array_equal(x.get(), s.astype(np.float16))
    ref = s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-5) * w.get().astype(np.float64)
    # two float16 roundings (the normed x, the product) of |value| <= ~2^-10 relative each
    np.testing.assert_allclose(out.get().astype(np.float64), ref, rtol=2.5e-3, atol=1e-3)


@pytest.mark.parametrize("B,S,nh,nkv,d,start,max_len", [
    (1, 1, 32, 32, 128, 127, 160), (2, 3, 4, 2, 64, 5, 12), (3, 1, 8, 1, 96, 0, 7), (1, 4, 3, 3, 6, 2, 6)])
@pytest.mark.parametrize("cached", [True, False])
def test_rope_cache(rng, B, S, nh, nkv, d, start, max_len, cached):
    import cupy
    from quickcupy.llama import ops
    qkv = _half(cupy, rng, (B, S, nh + 2 * nkv, d))
    config = LlamaConfig(hidden_size=nh * d, intermediate_size=8, num_attention_heads=nh, num_key_value_heads=nkv,
                         num_hidden_layers=1, rope_theta=float(rng.choice([1e4, 5e5])))
    cos, sin = rope_tables(config, np.arange(max_len))
    ck = _poisoned(cupy, (B, nkv, d, max_len)) if cached else None
    cv = _poisoned(cupy, (B, nkv, max_len, d)) if cached else None
    out = ops.rope_cache(qkv, cupy.asarray(cos), cupy.asarray(sin), cupy.asarray([start], np.int32), nh, nkv,
                         ck, cv, out=_poisoned(cupy, (B, S, nh + nkv, d)))
    x = qkv.get().astype(np.float64)
    c, s = cos[start:start + S, None, :].astype(np.float64), sin[start:start + S, None, :].astype(np.float64)
    x1, x2 = x[:, :, :nh + nkv, :d // 2], x[:, :, :nh + nkv, d // 2:]
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    got = out.get()
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=2e-3, atol=2e-3)
    if cached:
        keys, values = ck.get(), cv.get()
        written = slice(start, start + S)
        np.testing.assert_array_equal(keys[..., written], got[:, :, nh:].transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(values[:, :, written], qkv.get()[:, :, nh + nkv:].transpose(0, 2, 1, 3))
        # nothing else of the cache is touched
        others = np.ones(max_len, bool)
        others[written] = False
        assert np.isnan(keys[..., others]).all() and np.isnan(values[:, :, others]).all()


@pytest.mark.parametrize("shape", [(1, 2 * 11008), (3, 5, 14), (1, 2)])
def test_silu_mul(rng, shape):
    import cupy
    from quickcupy.llama import ops
    gate_up = _half(cupy, rng, shape, 3.0)
    out = ops.silu_mul(gate_up, out=_poisoned(cupy, shape[:-1] + (shape[-1] // 2,)))
    g, u = np.split(gate_up.get().astype(np.float64), 2, axis=-1)
    np.testing.assert_allclose(out.get().astype(np.float64), g / (1 + np.exp(-g)) * u, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("rows,V", [(1, 32000), (3, 7), (4, 50257)])
def test_argmax_rows_takes_the_first_maximum(rng, rows, V):
    import cupy
    from quickcupy.llama import ops
    logits = rng.standard_normal((rows, V)).astype(np.float16)
    for r in range(rows):            # a tie for the maximum: the lower index wins, as np.argmax
        i, j = sorted(rng.choice(V, 2, replace=False))
        logits[r, [i, j]] = logits[r].max() + 1
    got = ops.argmax_rows(cupy.asarray(logits), out=cupy.full(rows, -1, np.int64))
    np.testing.assert_array_equal(got.get(), np.argmax(logits, axis=-1))


def test_ops_check_their_inputs():
    import cupy
    from quickcupy.llama import ops
    x = cupy.zeros((2, 8), np.float16)
    with pytest.raises(ValueError, match="weight must be"):
        ops.add_rms_norm(x, cupy.zeros(4, np.float16), 1e-5)
    with pytest.raises(ValueError, match="float16"):
        ops.silu_mul(x.astype(np.float32))
    with pytest.raises(ValueError, match="start must be"):
        ops.rope_cache(cupy.zeros((1, 1, 3, 4), np.float16), cupy.zeros((4, 2), np.float32),
                       cupy.zeros((4, 2), np.float32), cupy.zeros(1, np.int64), 1, 1)


# ------------------------------------------------------------------------------------- the model
def _model(rng, backend, config=TINY, vocab=512):
    layers = [w.quantized(64) for w in random_layers(config, seed=_seed(rng))]
    return LlamaModel(config, layers, backend, 64, head=random_head(config, vocab, _seed(rng)))


@pytest.mark.parametrize("backend", ["fp16", "awq", "quick", "auto"])
def test_gpu_logits_match_numpy(rng, backend):
    """Logits of a prefill + cached decode steps vs the NumPy float32 model on the same weights."""
    import cupy
    layers = [w.quantized(64) for w in random_layers(TINY, seed=_seed(rng))]
    head = random_head(TINY, 512, _seed(rng))
    model = LlamaModel(TINY, layers, backend, 64, head=head)
    ids = rng.integers(0, 512, (2, 9))
    cache = model.new_cache(2, 16)
    steps = [model.logits(ids[:, :5], cache)] + [model.logits(ids[:, t:t + 1], cache) for t in range(5, 9)]
    reference = LlamaModel(TINY, layers, "numpy", 64, head=head).logits(ids)
    assert rel_error(cupy.concatenate(steps, axis=1).get(), reference) < 3e-3


@pytest.mark.parametrize("backend,batch", [("awq", 1), ("quick", 3), ("auto", 2), ("auto", 300)])
def test_graph_decode_is_bit_identical_to_eager(rng, backend, batch):
    """Logits of 6 decode steps, eager vs one captured graph replayed; batch 300 with auto is where
    eager auto runs dequant + cuBLAS, which the graph must avoid (capture would raise)."""
    import cupy
    model = _model(rng, backend)
    ids = cupy.asarray(rng.integers(0, 512, (batch, 7)))
    toks = cupy.asarray(rng.integers(0, 512, (6, batch)))
    runs = {}
    for graph in (False, True):
        cache = model.new_cache(batch, 16)
        logits = [model.prefill(ids, cache, graph)]
        logits += [model.decode_step(toks[t], cache, graph) for t in range(6)]
        runs[graph] = cupy.stack(logits).get()
        assert cache.length == 13 and int(cache.start_dev.get()[0]) == (13 if graph else 12)
    assert not np.isnan(runs[True]).any()
    if backend == "auto" and batch == 300:
        # eager ran dequant + cuBLAS, the graph the quick GEMM: same math, other summation order
        assert rel_error(runs[True], runs[False]) < 3e-3
    else:
        np.testing.assert_array_equal(runs[True], runs[False])


def test_generate_graph_equals_eager_and_recaptures_only_for_a_new_batch(rng):
    model = _model(rng, "quick")
    prompt = rng.integers(0, 512, (2, 5))
    eager = model.generate(prompt, 10, graph=False)
    graphed = model.generate(prompt, 10)
    np.testing.assert_array_equal(graphed, eager)
    g = model._graphs[2]
    np.testing.assert_array_equal(model.generate(prompt, 10), eager)      # same batch: same graph
    assert model._graphs[2] is g
    model.generate(rng.integers(0, 512, (3, 5)), 4)
    assert set(model._graphs) == {2, 3}


def test_graph_refuses_fp16(rng):
    model = _model(rng, "fp16")
    with pytest.raises(ValueError, match="cannot be captured"):
        DecodeGraph(model, model.new_cache(1, 8))


# -------------------------------------------------------------------------- Hugging Face reference
def _hf_model(config, layers, head, torch):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(HFConfig(
        vocab_size=head.embed_tokens.shape[0], hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, num_hidden_layers=config.num_hidden_layers,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, max_position_embeddings=256,
        tie_word_embeddings=False, attn_implementation="eager"))
    state = {"model.embed_tokens.weight": head.embed_tokens, "model.norm.weight": head.norm,
             "lm_head.weight": head.lm_head}
    for i, w in enumerate(layers):
        for name, sub in (("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"),
                          ("o_proj", "self_attn"), ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp")):
            state[f"model.layers.{i}.{sub}.{name}.weight"] = getattr(w, name)
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{name}.weight"] = getattr(w, name)
    hf.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
    return hf.to("cuda").eval()


def test_against_transformers(rng):
    """A 2-layer random model: logits of fp16/awq/quick vs HF float32 with the same (dequantized)
    weights, and 32 greedy tokens of the fp16 path equal to HF's generate."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import cupy
    config, vocab = TINY, 512
    # float16-representable weights, so HF float32 and our fp16 backend hold the same numbers.
    layers = random_layers(config, seed=_seed(rng))
    layers = [w.map_projections(lambda a: a.astype(np.float16).astype(np.float32)) for w in layers]
    head = random_head(config, vocab, _seed(rng))
    head.lm_head = head.lm_head.astype(np.float16).astype(np.float32)
    ids = rng.integers(0, vocab, (2, 12))
    tids = torch.from_numpy(ids).to("cuda")

    hf_float = _hf_model(config, layers, head, torch)
    quantized = [w.quantized(64) for w in layers]
    hf_deq = _hf_model(config, [w.dequantized() for w in quantized], head, torch)
    with torch.no_grad():
        ref = {"float": hf_float(tids).logits.double().cpu().numpy(), "deq": hf_deq(tids).logits.double().cpu().numpy()}
    for backend, weights, which in (("fp16", layers, "float"), ("awq", quantized, "deq"), ("quick", quantized, "deq")):
        model = LlamaModel(config, weights, backend, 64, head=head)
        got = cupy.asnumpy(model.logits(ids)).astype(np.float64)
        # float16 activations (a relative rounding of 2^-11 per op, ~40 ops deep) against float32:
        # the NumPy float32 stack agrees with HF to ~1e-7, the fp16 stacks to ~5e-4 (issue 13).
        assert rel_error(got, ref[which]) < 5e-3, backend

    # Greedy tokens: a random LM head leaves near-ties (top-2 gaps of 1e-3 of the logits' rms on
    # this tiny model, measured with the NumPy path), which float16 rounding may flip. An LM head
    # that maps each token's embedding to a permuted token, over blocks of std 0.01, leaves gaps
    # of ~7x the rms at every step (NumPy path, 6 seeds) while every op still runs.
    layers = random_layers(config, seed=_seed(rng), std=0.01)
    layers = [w.map_projections(lambda a: a.astype(np.float16).astype(np.float32)) for w in layers]
    head.lm_head = head.embed_tokens.astype(np.float32)[rng.permutation(vocab)]
    hf = _hf_model(config, layers, head, torch)
    model = LlamaModel(config, layers, "fp16", head=head)
    with torch.no_grad():
        hf_tokens = hf.generate(tids, max_new_tokens=32, do_sample=False,
                                pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].cpu().numpy()
    np.testing.assert_array_equal(model.generate(ids, 32), hf_tokens)
