"""The whole model on the CPU: embedding, final norm, LM head, generate, checkpoints with a head, the
tokenizer (quickcupy.llama.model / checkpoint); the --prompt-text command runs generate's code
(tests/test_generate.py)."""
import json

import numpy as np
import pytest

from quickcupy.__main__ import main
from quickcupy.llama import (HeadWeights, LlamaConfig, LlamaModel, load_checkpoint, random_head, random_layers,
                             rms_norm, save_awq_checkpoint)
from quickcupy.llama.checkpoint import EMBED, LM_HEAD, load_tokenizer
from quickcupy.quantize import quantize

TINY = LlamaConfig.preset("tiny")
VOCAB = 320   # a multiple of 8: a 4-bit LM head packs 8 output columns per int32


def _seed(rng):
    return int(rng.integers(2**31))


def _model(rng, backend="numpy", vocab=VOCAB):
    return LlamaModel(TINY, random_layers(TINY, seed=_seed(rng)), backend, head=random_head(TINY, vocab, _seed(rng)))


def test_logits_are_the_lm_head_of_the_normed_stack(rng):
    layers, head = random_layers(TINY, seed=_seed(rng)), random_head(TINY, VOCAB, _seed(rng))
    model = LlamaModel(TINY, layers, "numpy", head=head)
    ids = rng.integers(0, VOCAB, (2, 7))
    x = head.embed_tokens.astype(np.float32)[ids]
    expected = rms_norm(LlamaModel(TINY, layers, "numpy")(x), head.norm, TINY.rms_norm_eps) @ head.lm_head.T
    np.testing.assert_allclose(model.logits(ids), expected, rtol=1e-5, atol=1e-6)


def test_greedy_generate_is_the_argmax_of_the_full_forward(rng):
    model = _model(rng)
    ids = rng.integers(0, VOCAB, (3, 5))
    new = model.generate(ids, 8)
    assert new.shape == (3, 8) and new.dtype == np.int64
    # Each new token is the argmax of the logits of the full sequence up to it (no cache): the cached
    # decode, the sampling and the position bookkeeping together.
    logits = model.logits(np.concatenate([ids, new[:, :-1]], axis=1))
    np.testing.assert_array_equal(np.argmax(logits[:, 4:], axis=-1), new)


def test_sampling_is_seeded_and_respects_top_k(rng):
    model = _model(rng)
    ids = rng.integers(0, VOCAB, (2, 4))
    a = model.generate(ids, 6, temperature=1.5, top_k=3, seed=7)
    np.testing.assert_array_equal(a, model.generate(ids, 6, temperature=1.5, top_k=3, seed=7))
    # top_k=1 is greedy whatever the temperature.
    np.testing.assert_array_equal(model.generate(ids, 6, temperature=5.0, top_k=1), model.generate(ids, 6))
    # With top_k=3 every token is among the 3 most likely after its prefix.
    logits = model.logits(np.concatenate([ids, a[:, :-1]], axis=1))[:, 3:]
    top3 = np.argsort(logits, axis=-1)[..., -3:]
    assert (top3 == a[..., None]).any(axis=-1).all()


def test_stream_yields_generate_tokens_step_by_step(rng):
    """stream gives generate's tokens one step at a time (so a caller may stop early), its
    arguments checked at the call rather than at the first step."""
    model = _model(rng)
    ids = rng.integers(0, VOCAB, (2, 5))
    steps = model.stream(ids, 6, temperature=0.7, top_k=4, seed=3)
    first = next(steps)
    assert first.shape == (2,) and first.dtype == np.int64
    np.testing.assert_array_equal(np.stack([first, *steps], axis=1),
                                  model.generate(ids, 6, temperature=0.7, top_k=4, seed=3))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.stream(ids, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_k=VOCAB + 1), "top_k"),
    (dict(max_new_tokens=2, graph=True), "graph=True needs a 4-bit GPU backend"),
])
def test_generate_checks_its_arguments(rng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(rng).generate(rng.integers(0, VOCAB, (1, 3)), **kwargs)


def test_token_ids_are_checked(rng):
    model = _model(rng)
    with pytest.raises(ValueError, match=r"token_ids must lie in 0..319"):
        model.generate(np.array([[1, VOCAB]]), 2)
    with pytest.raises(ValueError, match="token_ids must be a \\(batch, seq\\) integer array"):
        model.generate(np.array([1, 2]), 2)
    with pytest.raises(ValueError, match="no embedding / LM head"):
        LlamaModel(TINY, random_layers(TINY, seed=1), "numpy").generate(np.array([[1]]), 2)


def test_head_shapes_are_checked(rng):
    head = random_head(TINY, VOCAB, _seed(rng))
    with pytest.raises(ValueError, match=r"lm_head has shape \(10, 256\)"):
        LlamaModel(TINY, random_layers(TINY, seed=1), "numpy", head=HeadWeights(head.embed_tokens, head.norm,
                                                                                 head.lm_head[:10]))


@pytest.mark.parametrize("lm_head", ["float", "quantized", "tied"])
def test_checkpoint_with_head_round_trip(rng, tmp_path, lm_head):
    pytest.importorskip("safetensors")
    layers, head = random_layers(TINY, seed=_seed(rng)), random_head(TINY, VOCAB, _seed(rng))
    head.lm_head = {"float": head.lm_head.astype(np.float16), "quantized": quantize(head.lm_head, 64),
                    "tied": None}[lm_head]
    save_awq_checkpoint(tmp_path, TINY.replace(tie_word_embeddings=lm_head == "tied"), layers, group_size=64,
                        head=head)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] == (lm_head == "tied")
    ckpt = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.head.embed_tokens, head.embed_tokens)
    np.testing.assert_array_equal(ckpt.head.norm, head.norm)
    if lm_head == "quantized":
        for part in ("codes", "zeros", "scales"):
            np.testing.assert_array_equal(getattr(ckpt.head.lm_head, part), getattr(head.lm_head, part))
    elif lm_head == "float":
        np.testing.assert_array_equal(ckpt.head.lm_head, head.lm_head)
    else:
        assert ckpt.head.lm_head is None
    model = LlamaModel(ckpt.config, ckpt.layers, "numpy", 64, head=ckpt.head)
    ids = rng.integers(0, VOCAB, (1, 4))
    lm = head.embed_tokens if lm_head == "tied" else head.lm_head
    lm = lm.dequantize(np.float32) if lm_head == "quantized" else lm.astype(np.float32)
    h = rms_norm(LlamaModel(ckpt.config, ckpt.layers, "numpy", 64)(head.embed_tokens.astype(np.float32)[ids]),
                 head.norm, TINY.rms_norm_eps)
    np.testing.assert_allclose(model.logits(ids), h @ lm.T, rtol=1e-5, atol=1e-6)


def test_checkpoint_without_lm_head_and_untied_is_refused(rng, tmp_path):
    pytest.importorskip("safetensors")
    head = random_head(TINY, VOCAB, _seed(rng))
    head.lm_head = None
    save_awq_checkpoint(tmp_path, TINY.replace(tie_word_embeddings=True), random_layers(TINY, seed=1),
                        group_size=64, head=head)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{EMBED} but no {LM_HEAD}.weight"):
        load_checkpoint(tmp_path)


def test_checkpoint_without_head_has_none(rng, tmp_path):
    pytest.importorskip("safetensors")
    save_awq_checkpoint(tmp_path, TINY, random_layers(TINY, seed=_seed(rng)), group_size=64)
    assert load_checkpoint(tmp_path).head is None


# ---------------------------------------------------------------------------------------- tokenizer
TEXTS = ["the quick brown fox jumps over the lazy dog", "a llama eats grass on the hill",
         "four bit weights and sixteen bit activations", "the dog and the fox are friends"] * 20


def _train_tokenizer(path, vocab_size=VOCAB):
    """A byte-level BPE tokenizer trained here on a few sentences (no download), saved as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(path / "tokenizer.json"))
    return tok


def test_tokenizer_round_trip(tmp_path):
    _train_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.get_vocab_size() <= VOCAB
    for text in ("the lazy llama", "bits, bytes & ünïcode!"):
        ids = tok.encode(text).ids
        assert all(0 <= i < VOCAB for i in ids)
        assert tok.decode(ids) == text


def test_load_tokenizer_names_the_missing_file(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_cli_prompt_text_needs_a_checkpoint(capsys):
    assert main(["llama", "--prompt-text", "hello"]) != 0
    assert "--prompt-text needs --checkpoint" in capsys.readouterr().err


def test_cli_vocab_needs_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: "no GPU in this test")
    assert main(["llama", "--vocab", "32000", "--layers", "2"]) != 0
    assert "--vocab times the whole model on the GPU: no GPU in this test" in capsys.readouterr().err


def test_cli_vocab_is_checked(capsys):
    assert main(["llama", "--vocab", "4"]) != 0
    assert "--vocab" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_cli_vocab_times_the_whole_model(tmp_path):
    """``llama --vocab`` end to end on a tiny model: every backend's decode at batch 1 and 2, and the
    batch-1 step split into GEMM and non-GEMM time (the GEMMs replaced by stand-ins that keep SiLU *
    up where the down GEMM would not run it itself)."""
    out = tmp_path / "model.json"
    assert main(["llama", "--preset", "tiny", "--vocab", "512", "--batch", "1,2", "--prompt", "8", "--gen", "4",
                 "--backends", "fp16,quick,auto", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {(g["backend"], g["batch"]) for g in report["generation"]} == {
        (b, n) for b in ("fp16", "quick", "auto") for n in (1, 2)}
    assert all(g["decode_tokens_per_s"] > 0 for g in report["generation"])
    for backend in ("quick", "auto"):
        step = report["decode_step_batch1"][backend]
        assert step["full_step_us"] > step["no_gemm_step_us"] > 0 and step["gemm_us_per_layer"] > 0
