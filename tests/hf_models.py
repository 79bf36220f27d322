"""Hugging Face transformers models holding quickcupy's weights, for the GPU tests that compare
against them, and what those comparisons share: the logits' tolerance, weights whose greedy tokens
have clear argmaxes and the check that they do. One builder serves every family of
quickcupy.llama.families: the transformers config class comes from ``model_type`` and the fields
from ``LlamaConfig.to_dict()`` (its names are transformers'). torch and transformers are imported
by the caller (``pytest.importorskip``); this module imports neither."""
import dataclasses

import numpy as np

from quickcupy.llama.model import NORMS, PROJECTIONS, HeadWeights, random_head, random_layers
from quickcupy.quantize import QuantizedWeight

# Logits against transformers float32 on the same (dequantized) weights, relative to the logits'
# norm: float16 activations land near 5e-4 on these models, bfloat16 rounds 8x coarser.
LOGIT_TOLERANCE = {"float16": 5e-3, "bfloat16": 4e-2}


def hf_config(config, vocab_size: int, max_position_embeddings: int = 32768):
    """The transformers config (LlamaConfig, MistralConfig, Qwen2Config, ...) of ``config``, eager
    attention (the reference: no fused kernel's own rounding). Fields the family's class does not
    have (llama's sliding_window, mistral's bias flags: fixed by the family) are left out; rope_theta
    and rope_scaling are taken by every transformers version (5 folds them into rope_parameters)."""
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[config.model_type]
    known = cls()
    fields = {k: v for k, v in config.to_dict().items()
              if k in ("rope_theta", "rope_scaling") or (k != "model_type" and hasattr(known, k))}
    if config.model_type == "qwen2":
        fields["use_sliding_window"] = False
    return cls(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, attn_implementation="eager",
               **fields)


def _float(w) -> np.ndarray:
    return w.dequantize(np.float32) if isinstance(w, QuantizedWeight) else np.asarray(w, np.float32)


def state_dict(config, layers, head) -> dict:
    """transformers' tensor names -> float32 NumPy arrays: quantized projections dequantized, an
    act-order perm folded into the weight's columns (x[..., perm] @ W.T == x @ W'.T, W'[:, perm] = W),
    biases under ``.bias``, no lm_head when the config ties it to the embedding."""
    state = {"model.embed_tokens.weight": head.embed_tokens, "model.norm.weight": head.norm}
    if head.lm_head is not None:
        state["lm_head.weight"] = _float(head.lm_head)
    for i, w in enumerate(layers):
        for name, sub in PROJECTIONS.items():
            weight = _float(getattr(w, name))
            if name in w.perms:
                folded = np.empty_like(weight)
                folded[:, np.asarray(w.perms[name])] = weight
                weight = folded
            state[f"model.layers.{i}.{sub}.{name}.weight"] = weight
            if name in w.biases:
                state[f"model.layers.{i}.{sub}.{name}.bias"] = w.biases[name]
        for name in NORMS:
            state[f"model.layers.{i}.{name}.weight"] = getattr(w, name)
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def hf_model(config, layers, head, torch, device: str = "cuda", max_position_embeddings: int = 32768):
    """The transformers causal LM of ``config``'s family (float32, eval mode, on ``device``) with
    the given weights; every parameter is checked to be loaded."""
    import transformers
    hf_conf = hf_config(config, head.embed_tokens.shape[0], max_position_embeddings)
    model = getattr(transformers, config.family.architecture)(hf_conf)
    state = {k: torch.from_numpy(v) for k, v in state_dict(config, layers, head).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, f"transformers' {config.family.architecture} has no {unexpected}"
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    assert not missing, f"not loaded into transformers' {config.family.architecture}: {missing}"
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    return model.to(device).eval()


def hf_logits(model, ids, torch) -> np.ndarray:
    """Logits (B, S, vocab) float64 of token ids (B, S) (NumPy) in one forward pass."""
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids)).to(model.device)).logits.double().cpu().numpy()


def hf_greedy(model, ids, n: int, torch):
    """transformers' greedy ``generate`` of n tokens after ids (B, S): (tokens (B, n) int64, the
    logits of each step (B, n, vocab) float64)."""
    with torch.no_grad():
        out = model.generate(torch.from_numpy(np.asarray(ids)).to(model.device), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, np.shape(ids)[1]:].cpu().numpy()
    logits = torch.stack(out.logits, dim=1).double().cpu().numpy()
    return tokens, logits


# ------------------------------------------------------------------------------- greedy test data
def cycle_design(c, layers, head, rng):
    """Weights under which a tied model's greedy continuation of token t is t + 1, by wide margins.

    Embeddings e_t = [Q^t u ; 1 on 8 constant dims] (Q a random orthogonal (H-8) x (H-8) matrix,
    so distinct e_t are nearly orthogonal in their first H - 8 dims); the last layer's MLP computes
    about 16 Q (the normed residual's first H - 8 dims): gate reads the constant dims (silu of a
    positive number near 8 for every token), up copies, down applies Q. The residual stream then
    points at e_{t+1} and the tied LM head picks t + 1. The other weights stay random (std 0.01),
    biases included; prompts must keep clear of the last 40 tokens (t + 1 must exist)."""
    H, I, k = c.hidden_size, c.intermediate_size, 8
    vocab = head.embed_tokens.shape[0]
    Q, _ = np.linalg.qr(rng.standard_normal((H - k, H - k)))
    u = rng.standard_normal(H - k)
    embed = np.empty((vocab, H))
    for t in range(vocab):
        embed[t, :H - k], embed[t, H - k:] = u, 1.0
        u = Q @ u
    embed *= 0.02
    last = layers[-1]
    gate, up, down = np.zeros((I, H)), np.zeros((I, H)), np.zeros((H, I))
    gate[:, H - k:] = 1.0          # normed constant dims are ~1 each: gate ~8, silu(8) ~8
    up[np.arange(H - k), np.arange(H - k)] = 1.0
    down[:H - k, :H - k] = 2.0 * Q
    layers = layers[:-1] + [dataclasses.replace(last, gate_proj=gate.astype(np.float32),
                                                up_proj=up.astype(np.float32), down_proj=down.astype(np.float32))]
    return layers, HeadWeights(embed.astype(np.float16), head.norm, None)


def greedy_design(c, vocab: int, rng):
    """(float layers, head) of ``c`` whose greedy tokens have clear argmaxes: weak random blocks
    (std 0.01) and, untied, an LM head mapping each token's embedding to a permuted token (top-2
    gaps of several times the logits' rms); tied, :func:`cycle_design`."""
    layers = random_layers(c, seed=int(rng.integers(2**31)), std=0.01)
    head = random_head(c, vocab, int(rng.integers(2**31)))
    if c.tie_word_embeddings:
        return cycle_design(c, layers, head, rng)
    head.lm_head = head.embed_tokens.astype(np.float32)[rng.permutation(vocab)]
    return layers, head


def assert_no_near_tie(step_logits, tolerance: float):
    """The margin check of a greedy comparison: every step's top-2 gap of the reference's logits
    (B, n, vocab) exceeds 10x ``tolerance`` (the logits' relative tolerance) times their rms, so
    a token that differs is an error, not a tie broken the other way."""
    top2 = np.sort(step_logits, axis=-1)[..., -2:]
    gaps = (top2[..., 1] - top2[..., 0]) / np.sqrt((step_logits ** 2).mean(-1))
    assert gaps.min() > 10 * tolerance, f"near-tie in the test data: gap {gaps.min():.3g}"
