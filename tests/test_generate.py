"""``python -m quickcupy generate`` (quickcupy.tools.generate): a tiny AutoAWQ checkpoint with a
word-level tokenizer.json made here, the printed text against LlamaModel.generate's tokens decoded,
BOS put first, the stop at EOS, sampling passed through, the stats line and the one-line errors."""
import json
import re
import sys

import numpy as np
import pytest

from quickcupy.__main__ import main
from quickcupy.llama import LlamaConfig, LlamaModel, random_head, random_layers, save_awq_checkpoint
from quickcupy.llama import checkpoint
from quickcupy.tools import generate

TINY = LlamaConfig.preset("tiny")
WORDS = ("the quick brown fox jumps over lazy dog a llama eats grass on hill four bit weights and sixteen "
         "activations are friends").split()
SPECIAL = ["<unk>", "<s>", "</s>"]
VOCAB = 64                       # the model's; the tokenizer uses the first len(SPECIAL + WORDS)
BOS, EOS = 1, 2
STATS = re.compile(r"^prompt (\d+) tokens, generated (\d+) tokens( \(stopped at EOS\))?; prefill [\d.]+ ms, "
                   r"decode ([\d.]+ tokens/s|-) \[(\w+), (\w+)\]$")


def _tokenizer(path):
    """A word-level tokenizer.json over WORDS (whitespace split; decoding joins with spaces)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(SPECIAL + list(WORDS))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path / "tokenizer.json"))
    return tok


def _checkpoint(tmp_path, rng, **config):
    """A 2-layer checkpoint with an embedding and a float LM head, its tokenizer, and ``config``
    merged into its config.json (bos_token_id, eos_token_id)."""
    pytest.importorskip("safetensors")
    tok = _tokenizer(tmp_path)
    seed = int(rng.integers(2**31))
    save_awq_checkpoint(tmp_path, TINY, random_layers(TINY, seed=seed), group_size=64,
                        head=random_head(TINY, VOCAB, seed + 1))
    _merge_config(tmp_path, **config)
    return tok


def _merge_config(path, **config):
    f = path / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **config}))


def _numpy_model(path):
    ckpt = checkpoint.load_checkpoint(path)
    return LlamaModel(ckpt.config, ckpt.layers, "numpy", head=ckpt.head)


def _run(capsys, path, *extra):
    code = main(["generate", "--checkpoint", str(path), "--prompt", "the quick brown fox", "--backend", "numpy",
                 *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_prints_the_decoded_greedy_tokens_and_the_stats(rng, tmp_path, capsys):
    tok = _checkpoint(tmp_path, rng)
    code, lines, _ = _run(capsys, tmp_path, "--max-new-tokens", "6")
    assert code == 0 and len(lines) == 2
    ids = tok.encode("the quick brown fox").ids
    new = _numpy_model(tmp_path).generate(np.asarray([ids]), 6)[0].tolist()
    assert lines[0] == tok.decode(ids + new)
    m = STATS.match(lines[1])
    assert m, lines[1]
    assert (int(m[1]), int(m[2]), m[3], m[5], m[6]) == (4, 6, None, "numpy", "float32")
    assert m[4].endswith("tokens/s")


def test_bos_first_and_the_stop_at_eos(rng, tmp_path, capsys):
    """config.json's bos_token_id goes first; the EOS is a token the model generates at step 4
    (its first time there or earlier), so the text stops before it."""
    tok = _checkpoint(tmp_path, rng, bos_token_id=BOS)
    ids = [BOS] + tok.encode("the quick brown fox").ids
    new = _numpy_model(tmp_path).generate(np.asarray([ids]), 8)[0].tolist()
    eos = new[4]
    first = new.index(eos)
    _merge_config(tmp_path, eos_token_id=[EOS, eos])          # a list, as Llama-3's config writes it
    code, lines, _ = _run(capsys, tmp_path, "--max-new-tokens", "8")
    assert code == 0
    assert lines[0] == tok.decode(ids + new[:first])
    m = STATS.match(lines[1])
    assert m and (int(m[1]), int(m[2]), m[3]) == (5, first, " (stopped at EOS)"), lines[1]


def test_eos_from_generation_config(rng, tmp_path, capsys):
    tok = _checkpoint(tmp_path, rng)
    ids = tok.encode("the quick brown fox").ids
    first = _numpy_model(tmp_path).generate(np.asarray([ids]), 1)[0, 0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": int(first)}))
    code, lines, _ = _run(capsys, tmp_path, "--max-new-tokens", "5")
    assert code == 0 and lines[0] == tok.decode(ids)
    m = STATS.match(lines[1])
    assert m and (int(m[2]), m[3], m[4]) == (0, " (stopped at EOS)", "-"), lines[1]


def test_sampling_settings_reach_the_model(rng, tmp_path, capsys):
    tok = _checkpoint(tmp_path, rng)
    code, lines, _ = _run(capsys, tmp_path, "--max-new-tokens", "7", "--temperature", "1.5", "--top-k", "5",
                          "--seed", "11")
    assert code == 0
    ids = tok.encode("the quick brown fox").ids
    new = _numpy_model(tmp_path).generate(np.asarray([ids]), 7, temperature=1.5, top_k=5, seed=11)[0].tolist()
    assert lines[0] == tok.decode(ids + new)


def test_without_a_gpu_the_numpy_path_runs_with_a_note(rng, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: "no GPU in this test")
    _checkpoint(tmp_path, rng)
    code = main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a llama", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 0
    assert "no GPU in this test: running the NumPy float32 path on the CPU" in captured.err
    assert STATS.match(captured.out.splitlines()[-1])


def test_llama_prompt_text_runs_generate(rng, tmp_path, capsys, monkeypatch):
    """The llama tool's --prompt-text is the same run, with a note pointing at generate."""
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: "no GPU in this test")
    _checkpoint(tmp_path, rng)
    assert main(["llama", "--checkpoint", str(tmp_path), "--prompt-text", "the quick brown fox", "--gen", "4"]) == 0
    old = capsys.readouterr()
    assert "--prompt-text TEXT is deprecated; use python -m quickcupy generate" in old.err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "the quick brown fox",
                 "--max-new-tokens", "4", "--backend", "numpy"]) == 0
    assert old.out.splitlines()[0] == capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["--temperature", "-1"], "--temperature=-1 must be >= 0"),
    (["--temperature", "hot"], "--temperature: 'hot' is not a number"),
    (["--temperature", "nan"], "--temperature=nan must be a finite number"),
    (["--top-k", "0"], "--top-k=0 must be >= 1"),
    (["--backend", "fast"], "--backend 'fast' is not one of auto, quick, awq, dense, numpy"),
    (["--dtype", "int8"], "--dtype 'int8' is not one of"),
])
def test_bad_values_are_one_line(extra, message, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_missing_checkpoint_or_tokenizer_is_named(rng, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "--checkpoint " + str(tmp_path / "nowhere") + " is not a directory" in capsys.readouterr().err
    _checkpoint(tmp_path, rng)
    (tmp_path / "tokenizer.json").unlink()
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def test_missing_tokenizers_package_is_named(rng, tmp_path, capsys, monkeypatch):
    _checkpoint(tmp_path, rng)
    monkeypatch.setitem(sys.modules, "tokenizers", None)          # import tokenizers now raises ImportError
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--backend", "numpy"]) == 2
    assert "the 'tokenizers' package, which reads tokenizer.json, is not installed" in capsys.readouterr().err


def test_a_checkpoint_without_a_head_is_refused(rng, tmp_path, capsys):
    pytest.importorskip("safetensors")
    _tokenizer(tmp_path)
    save_awq_checkpoint(tmp_path, TINY, random_layers(TINY, seed=int(rng.integers(2**31))), group_size=64)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--backend", "numpy"]) == 2
    assert "generating text needs the embedding and the LM head" in capsys.readouterr().err


def test_bad_token_ids_in_config_are_named(rng, tmp_path, capsys):
    _checkpoint(tmp_path, rng, eos_token_id="</s>")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--backend", "numpy"]) == 2
    assert "config.json eos_token_id='</s>' is not a token id" in capsys.readouterr().err
    _merge_config(tmp_path, eos_token_id=None, bos_token_id=VOCAB + 5)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--backend", "numpy"]) == 2
    assert f"token id {VOCAB + 5}, beyond the model's vocabulary of {VOCAB}" in capsys.readouterr().err


def test_encode_puts_bos_first_once():
    class Tok:
        def __init__(self, ids):
            self.ids = ids

        def encode(self, text):
            return self

    assert generate.encode(Tok([5, 6]), "x", 1) == [1, 5, 6]
    assert generate.encode(Tok([1, 5, 6]), "x", 1) == [1, 5, 6]       # the post-processor put it there
    assert generate.encode(Tok([5, 6]), "x", None) == [5, 6]
    assert generate.encode(Tok([]), "", 1) == [1]
    with pytest.raises(generate.UsageError, match="--prompt encodes to no tokens"):
        generate.encode(Tok([]), "", None)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype", [("auto", "fp16"), ("quick", "bf16"), ("awq", "fp16"), ("dense", "fp16")])
def test_gpu_backends_print_their_model_tokens(backend, dtype, rng, tmp_path, capsys):
    """On the GPU the tool's text is the decoded tokens of LlamaModel.generate on the same backend
    (the decode graph on the 4-bit backends), and the stats name the backend and dtype."""
    tok = _checkpoint(tmp_path, rng)
    code, lines, _ = _run(capsys, tmp_path, "--max-new-tokens", "12", "--backend", backend, "--dtype", dtype)
    assert code == 0
    ckpt = checkpoint.load_checkpoint(tmp_path)
    name = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    model = LlamaModel(ckpt.config, ckpt.layers, backend, head=ckpt.head, dtype=name)
    ids = tok.encode("the quick brown fox").ids
    new = model.generate(np.asarray([ids]), 12)[0].tolist()
    assert lines[0] == tok.decode(ids + new)
    m = STATS.match(lines[1])
    assert m and (int(m[2]), m[5], m[6]) == (12, backend, name), lines[1]
