"""Hugging Face transformers models holding quickcupy's weights, for the GPU tests that compare
against them. One builder serves every family of quickcupy.llama.families: the transformers config
class comes from ``model_type`` and the fields from ``LlamaConfig.to_dict()`` (its names are
transformers'). torch and transformers are imported by the caller (``pytest.importorskip``)."""
import numpy as np

from quickcupy.llama.model import NORMS, PROJECTIONS
from quickcupy.quantize import QuantizedWeight


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
