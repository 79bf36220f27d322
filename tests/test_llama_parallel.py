"""Tensor parallelism of the Llama model (quickcupy.llama.parallel) and ``llama --tp`` (tools.llama_tp):
the slices of every projection put back together are the layer; refusals name their rule; ranks
emulated one after another (distributed.LocalGroup) give the unsharded model's logits, on NumPy to
float32 rounding and, on a GPU, with the 4-bit backends to 16-bit rounding, eagerly and as one
captured decode step; a one-rank NCCL model in its own decode graph equals the plain model; the
--tp launcher through NCCL with one rank."""
import dataclasses
import json
import re

import numpy as np
import pytest

from conftest import rel_error
from quickcupy.__main__ import build_parser, main
from quickcupy.distributed import LocalGroup
from quickcupy.llama import LlamaConfig, LlamaModel, random_head, random_layers
from quickcupy.llama.model import projection_shapes
from quickcupy.llama.parallel import (COLUMN, SPLIT, ShardConfig, VocabParallelHead, check_shardable, rank_model,
                                      shard_config, shard_layer, shard_lm_head)
from quickcupy.quantize import QuantizedWeight, quantize
from quickcupy.tools import llama_bench, llama_tp

TINY = LlamaConfig.preset("tiny")          # 4 heads, 2 KV heads (GQA), head_dim 64
MHA = TINY.replace(num_key_value_heads=4)
WIDE = TINY.replace(hidden_size=384)       # head_dim 96: o_proj's 384 columns split in 2 hold 1.5 groups of 128
VOCAB = 512
DTYPES = ["float16", "bfloat16"]
EPS = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def _seed(rng):
    return int(rng.integers(2**31))


def _np_dtype(dtype):
    from quickcupy.dtypes import np_dtype
    return np_dtype(dtype)


def _with_biases(rng, layers, names=("q_proj", "k_proj", "v_proj"), config=TINY):
    """Qwen2's q/k/v biases (or ``names``'), random."""
    shapes = projection_shapes(config)
    return [dataclasses.replace(w, biases={n: 0.1 * rng.standard_normal(shapes[n][0]).astype(np.float32)
                                           for n in names}) for w in layers]


def _unshard(shards):
    """The float layer whose rank slices are ``shards`` (rank order): column-parallel projections
    and biases stacked by rows, row-parallel ones by columns (their biases: rank 0's)."""
    def dense(w):
        return w.dequantize(np.float64) if isinstance(w, QuantizedWeight) else np.asarray(w)
    tensors = {n: np.concatenate([dense(getattr(s, n)) for s in shards], axis=axis) for n, axis in SPLIT.items()}
    biases = {n: np.concatenate([s.biases[n] for s in shards]) if SPLIT[n] == COLUMN else shards[0].biases[n]
              for n in shards[0].biases}
    return tensors, biases


# ----------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
def test_slices_reassemble_every_projection(rng, world, quantized):
    layer = _with_biases(rng, random_layers(TINY, seed=_seed(rng)),
                         ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "gate_proj"))[0]
    layer = dataclasses.replace(layer, perms={"q_proj": rng.permutation(TINY.hidden_size),
                                              "gate_proj": rng.permutation(TINY.hidden_size)})
    if quantized:
        layer = layer.quantized(64)              # biases and permutations stay
    shards = [shard_layer(layer, TINY, r, world) for r in range(world)]
    shard = shard_config(TINY, world)
    for r, s in enumerate(shards):
        s.check(shard)
        # rank r's query heads read KV heads [r nkv/w, (r+1) nkv/w): its own
        assert shard.num_attention_heads // shard.num_key_value_heads == TINY.num_attention_heads // TINY.num_key_value_heads
        assert set(s.biases) == ({"q_proj", "k_proj", "v_proj", "gate_proj"} | ({"o_proj", "down_proj"} if r == 0 else set()))
        for name in ("q_proj", "gate_proj"):                  # column-parallel layers keep their permutation
            np.testing.assert_array_equal(s.perms[name], layer.perms[name])
        np.testing.assert_array_equal(s.input_layernorm, layer.input_layernorm)
    tensors, biases = _unshard(shards)
    for name in SPLIT:
        w = getattr(layer, name)
        np.testing.assert_array_equal(tensors[name], w.dequantize(np.float64) if quantized else w)
    for name, b in layer.biases.items():
        np.testing.assert_array_equal(biases[name], b)


def test_shard_config_keeps_the_head_dim_and_the_residual():
    shard = shard_config(TINY, 2)
    assert isinstance(shard, ShardConfig) and shard.world == 2
    assert (shard.hidden_size, shard.head_dim) == (TINY.hidden_size, TINY.head_dim)
    assert (shard.num_attention_heads, shard.num_key_value_heads, shard.intermediate_size) == (2, 1, 256)
    assert projection_shapes(shard) == {"q_proj": (128, 256), "k_proj": (64, 256), "v_proj": (64, 256),
                                        "o_proj": (256, 128), "gate_proj": (256, 256), "up_proj": (256, 256),
                                        "down_proj": (256, 256)}
    assert shard.replace(num_hidden_layers=5).head_dim == TINY.head_dim
    assert shard_config(TINY, 1).head_dim == TINY.head_dim


def test_lm_head_rows_split_by_vocabulary(rng):
    head = random_head(TINY, VOCAB, _seed(rng))
    np.testing.assert_array_equal(np.concatenate([shard_lm_head(head, r, 4) for r in range(4)]), head.lm_head)
    head.lm_head = quantize(head.lm_head, 64)
    parts = [shard_lm_head(head, r, 2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.codes for p in parts]), head.lm_head.codes)
    head.lm_head = None                                          # tied: the embedding's rows
    np.testing.assert_array_equal(shard_lm_head(head, 1, 2), head.embed_tokens[VOCAB // 2:])


@pytest.mark.parametrize("config,world,kwargs,match", [
    (TINY, 4, {}, "num_key_value_heads=2 is not a multiple of world=4"),
    (TINY.replace(num_attention_heads=8, num_key_value_heads=8, hidden_size=256 * 3, intermediate_size=768), 3,
     {}, "num_attention_heads=8 is not a multiple of world=3"),
    (TINY.replace(intermediate_size=545), 2, {}, "intermediate_size=545 is not a multiple of world=2"),
    (TINY, 0, {}, "world must be a positive int"),
    (WIDE, 2, dict(group_size=128), r"o_proj \(4-bit, group_size=128\): in_features=384 split 2 ways gives 192 "
                                    "columns, not a whole number of groups of group_size=128"),
    (TINY.replace(intermediate_size=560), 2, dict(group_size=64),
     r"gate_proj \(4-bit, group_size=64\): out_features=560 does not split into 2 shards that are multiples of 32"),
    (TINY, 2, dict(group_size=-1), None),                       # one group per row: each shard's row is its group
    (TINY, 2, dict(vocab_size=321), r"the vocabulary \(321 tokens\) is not a multiple of world=2"),
])
def test_splits_that_cannot_be_made_are_refused(config, world, kwargs, match):
    if match is None:
        assert check_shardable(config, world, **kwargs) == shard_config(config, world)
        return
    with pytest.raises(ValueError, match=match):
        check_shardable(config, world, **kwargs)


def test_shard_layer_refusals(rng):
    layer = random_layers(TINY, seed=_seed(rng))[0]
    with pytest.raises(ValueError, match="down_proj has an act-order permutation"):
        shard_layer(dataclasses.replace(layer, perms={"down_proj": rng.permutation(TINY.intermediate_size)}),
                    TINY, 0, 2)
    identity = dataclasses.replace(layer, perms={"o_proj": np.arange(TINY.hidden_size)})
    assert shard_layer(identity, TINY, 1, 2).perms == {}        # an identity permutation is no permutation
    with pytest.raises(ValueError, match="o_proj: in_features=384 split 2 ways gives 192 columns"):
        shard_layer(random_layers(WIDE, seed=1)[0].quantized(128), WIDE, 0, 2)
    with pytest.raises(ValueError, match="rank=2 must lie in 0..world-1"):
        shard_layer(layer, TINY, 2, 2)
    with pytest.raises(ValueError, match="already a shard"):
        shard_config(shard_config(TINY, 2), 2)
    with pytest.raises(ValueError, match="has shape"):              # the full layer is checked first
        shard_layer(dataclasses.replace(layer, o_proj=layer.o_proj[:, :128]), TINY, 0, 2)


# ----------------------------------------------------------------------------- emulated, NumPy
def _emulated(config, layers, head, world, backend="numpy", group_size=64, dtype="float16"):
    group = LocalGroup(world)
    return group, [rank_model(config, layers, group.communicator(r), backend, group_size, head, dtype)
                   for r in range(world)]


@pytest.mark.parametrize("config,world,int4", [(TINY, 2, False), (TINY, 1, False), (MHA, 4, False), (TINY, 2, True)],
                         ids=["gqa-2", "one", "mha-4", "gqa-2-int4"])
def test_emulated_ranks_give_the_unsharded_logits(rng, config, world, int4):
    """int4: 4-bit layers and LM head, sliced as QuantizedWeights (NumPy runs them dequantized)."""
    layers = _with_biases(rng, random_layers(config, seed=_seed(rng)), config=config)
    head = random_head(config, VOCAB, _seed(rng))
    if int4:
        layers, head.lm_head = [w.quantized(64) for w in layers], quantize(head.lm_head, 64)
    ids = rng.integers(0, VOCAB, (2, 9))
    full = LlamaModel(config, layers, "numpy", head=head).logits(ids)
    group, models = _emulated(config, layers, head, world)
    assert all(isinstance(m.lm_head, VocabParallelHead) for m in models)
    assert models[0].blocks[0].config.num_key_value_heads == config.num_key_value_heads // world
    out = group.run(lambda r: models[r].logits(ids))
    for r in range(world):
        assert out[r].shape == (2, 9, VOCAB) and out[r].dtype == np.float32
        np.testing.assert_array_equal(out[r], out[0])               # every rank holds the same logits
    # The o and down products are split over K and summed: float32 rounding apart.
    np.testing.assert_allclose(out[0], full, rtol=1e-4, atol=1e-5 * np.abs(full).max())


def test_emulated_ranks_generate_the_unsharded_tokens(rng):
    layers, head = random_layers(TINY, seed=_seed(rng)), random_head(TINY, VOCAB, _seed(rng))
    ids = rng.integers(0, VOCAB, (3, 5))
    expected = LlamaModel(TINY, layers, "numpy", head=head).generate(ids, 8)
    group, models = _emulated(TINY, layers, head, 2)
    for tokens in group.run(lambda r: models[r].generate(ids, 8)):   # cached decode, per-rank KV heads
        np.testing.assert_array_equal(tokens, expected)
    caches = group.run(lambda r: models[r]._gen_cache)
    assert all(c.keys[0].shape[1] == TINY.num_key_value_heads // 2 for c in caches)


def test_rank_model_quantizes_after_the_split(rng):
    """Float layers on a 4-bit backend: each rank quantizes its slice, the same codes as slicing the
    quantized layer (checked on the weights: NumPy stands in for the 4-bit GEMM here)."""
    layer = random_layers(TINY, seed=_seed(rng))[0]
    for r in range(2):
        sliced_then_quantized = shard_layer(layer, TINY, r, 2).quantized(64)
        quantized_then_sliced = shard_layer(layer.quantized(64), TINY, r, 2)
        for name in SPLIT:
            a, b = getattr(sliced_then_quantized, name), getattr(quantized_then_sliced, name)
            for part in ("codes", "zeros", "scales"):
                np.testing.assert_array_equal(getattr(a, part), getattr(b, part))


# ------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("argv,match", [
    (["--tp", "0"], "--tp=0 must be >= 1"),
    (["--tp", "two"], "--tp: 'two' is not an integer"),
    (["--tp", "3"], "--tp 3: num_attention_heads=32 is not a multiple of world=3"),
    (["--tp", "4", "--preset", "tiny"], "--tp 4: num_key_value_heads=2 is not a multiple of world=4"),
    (["--tp", "4"], r"--tp 4: down_proj \(4-bit, group_size=128\): in_features=11008 split 4 ways gives 2752"),
    (["--tp", "2", "--vocab", "32001"], r"--tp 2: the vocabulary \(32001 tokens\) is not a multiple of world=2"),
    (["--tp", "2", "--checkpoint", "ckpt"], "--tp builds random weights .* it does not take --checkpoint"),
    (["--tp", "2", "--prompt-text", "hi"], "--tp times the whole model; it does not take --prompt-text"),
])
def test_cli_tp_is_checked_before_anything_starts(argv, match, capsys):
    assert main(["llama", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(match, err), err


def test_cli_tp_settings():
    parse = build_parser().parse_args
    assert llama_bench.settings(parse(["llama"])).tp == 1
    s = llama_bench.settings(parse(["llama", "--tp", "2", "--backends", "dense", "--tp", "4"]))
    assert (s.tp, s.vocab) == (4, llama_bench.DEFAULT_TP_VOCAB)      # dense: no group rule; 7b splits 4 ways
    assert llama_bench.settings(parse(["llama", "--tp", "4", "--group-size", "64"])).tp == 4
    assert llama_bench.settings(parse(["llama", "--tp", "2", "--vocab", "1000"])).vocab == 1000


def test_cli_tp_needs_gpus(capsys, monkeypatch):
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: "no GPU in this test")
    assert main(["llama", "--tp", "2"]) == 2
    assert "--tp 2 runs one process per GPU: no GPU in this test" in capsys.readouterr().err
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: None)
    monkeypatch.setattr(llama_tp, "visible_gpus", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["llama", "--tp", "2"]) == 2
    assert "--tp 2 needs 2 GPUs, 1 visible" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert main(["llama", "--tp", "2", "--preset", "tiny"]) == 2
    assert "--tp 2 needs 2 GPUs, 1 visible (CUDA_VISIBLE_DEVICES=3)" in capsys.readouterr().err


def test_cli_tp_one_is_the_one_gpu_run(monkeypatch):
    """--tp 1 starts no process and needs no NCCL: the plain run."""
    monkeypatch.setattr(llama_tp, "run", lambda s: pytest.fail("--tp 1 went to the launcher"))
    called = []
    monkeypatch.setattr(llama_bench, "run_model", lambda s: called.append(s) or 0)
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: None)
    assert main(["llama", "--tp", "1", "--vocab", "512"]) == 0
    assert called and called[0].tp == 1


@pytest.mark.slow
@pytest.mark.skipif(llama_tp.visible_gpus() >= 2, reason="with two GPUs rank 1 would start (and wait in NCCL)")
def test_launcher_stops_the_ranks_when_one_fails(capfd):
    """Rank 1 cannot take GPU 1 here; rank 0 (which would wait for it) is stopped and the launch
    reports rank 1's failure."""
    s = llama_bench.settings(build_parser().parse_args(["llama", "--preset", "tiny", "--tp", "2", "--vocab", "512"]))
    assert llama_tp.launch(s, 2, bytes(128)) == 1
    assert "error: quickcupy llama rank" in capfd.readouterr().err


def test_tp_report_lines():
    report = {"tp": 2, "nccl_version": 22707,
              "shard": {"num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5504, "vocab": 16000},
              "decode_step_batch1": {"quick": {"gemm_us_per_layer": 30.0, "non_gemm_us_per_layer": 25.5,
                                               "all_reduce_us_per_layer": 10.5}}}
    text = llama_tp.format_tp(report)
    assert "tensor parallel: 2 GPUs, one process each, NCCL 2.27.7" in text
    assert "[quick] batch-1 decode step per layer: GEMMs 30.0 us, all-reduces 10.5 us (2, timed alone in a graph), " \
           "other 15.0 us" in text


# -------------------------------------------------------------------------------------------- GPU
def _quantized(rng, config=TINY, group_size=64):
    return [w.quantized(group_size) for w in _with_biases(rng, random_layers(config, seed=_seed(rng)))]


def _group_decode_graph(group, models, caches, ids):
    """One CUDA graph of a decode step of every emulated rank, captured as DecodeGraph captures one
    model's: an eager step first (compiles, fills the pool), then the same under capture, all ranks
    on one stream and one memory pool; the positions advance as its last nodes. Returns
    (graph, stream, pool, hidden by rank); the pool lives as long as the graph."""
    import cupy
    from quickcupy.llama import ops
    stream, pool = cupy.cuda.Stream(non_blocking=True), cupy.cuda.MemoryPool()

    def step(rank):
        with cupy.cuda.using_allocator(pool.malloc), stream:
            return models[rank]._normed_hidden(ids, caches[rank], fill_start=False)
    cupy.cuda.get_current_stream().synchronize()
    group.run(step)
    stream.synchronize()
    stream.begin_capture()
    try:
        hidden = group.run(step)
        with cupy.cuda.using_allocator(pool.malloc), stream:
            for cache in caches:
                ops.advance_position(cache.start_dev)
    finally:
        graph = stream.end_capture()
    return graph, stream, pool, hidden


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["quick", "auto"])
def test_gpu_emulated_ranks_match_the_unsharded_model(rng, backend, dtype):
    """Two ranks on one GPU (4-bit GEMMs, emulated all-reduces) against the unsharded model: logits
    of a prefill and 5 decode steps, eagerly and with the ranks' decode step captured as one graph
    (the graph bit for bit the eager ranks)."""
    import cupy
    layers, head = _quantized(rng), random_head(TINY, VOCAB, _seed(rng))
    full = LlamaModel(TINY, layers, backend, 64, head=head, dtype=dtype)
    group, models = _emulated(TINY, layers, head, 2, backend, 64, dtype)
    B = 3
    ids = cupy.asarray(rng.integers(0, VOCAB, (B, 7)))
    toks = cupy.asarray(rng.integers(0, VOCAB, (5, B)))

    cache = full.new_cache(B, 16)
    expected = [full.prefill(ids, cache)] + [full.decode_step(toks[t], cache) for t in range(5)]
    expected = cupy.stack(expected).get().astype(np.float32)

    def eager(rank):
        c = models[rank].new_cache(B, 16)
        return [models[rank].prefill(ids, c)] + [models[rank].decode_step(toks[t], c) for t in range(5)]
    runs = group.run(eager)
    eager_logits = [cupy.stack(r).get().astype(np.float32) for r in runs]
    np.testing.assert_array_equal(eager_logits[0], eager_logits[1])
    assert not np.isnan(eager_logits[0]).any()
    assert rel_error(eager_logits[0], expected) < 8 * EPS[dtype]

    caches = [m.new_cache(B, 16) for m in models]
    first = group.run(lambda r: models[r].prefill(ids, caches[r], graph=True))    # fills start_dev
    step_ids = cupy.zeros((B, 1), np.int64)
    graph, stream, pool, hidden = _group_decode_graph(group, models, caches, step_ids)
    graphed = [first[0]]
    for t in range(5):
        step_ids[:, 0] = toks[t]
        for h in hidden:                    # poisoned: the replay must write them
            h[...] = cupy.full(h.shape, np.nan, np.float32).astype(h.dtype)
        graph.launch(cupy.cuda.get_current_stream())
        for c in caches:
            c.length += 1
        graphed.append(group.run(lambda r: models[r].lm_head(hidden[r][:, -1]))[0])
    assert [int(c.start_dev.get()[0]) for c in caches] == [12, 12]
    np.testing.assert_array_equal(cupy.stack(graphed).get().astype(np.float32), eager_logits[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_nccl_one_rank_model_in_its_decode_graph(rng, dtype):
    """A one-rank NCCL model (its all-reduces and LM-head all-gather through NCCL, the reduces
    captured inside DecodeGraph) generates the plain model's tokens, and its logits are the plain
    model's bit for bit."""
    import cupy
    from quickcupy.distributed import Communicator, NcclUnavailable, unique_id
    try:
        uid = unique_id()
    except NcclUnavailable as exc:
        pytest.skip(str(exc))
    layers, head = _quantized(rng), random_head(TINY, VOCAB, _seed(rng))
    plain = LlamaModel(TINY, layers, "quick", 64, head=head, dtype=dtype)
    ids = rng.integers(0, VOCAB, (2, 6))
    with Communicator(0, 1, uid, device=0) as comm:
        model = rank_model(TINY, layers, comm, "quick", 64, head, dtype)
        np.testing.assert_array_equal(model.generate(ids, 10), plain.generate(ids, 10))
        assert model._graphs                       # the decode steps replayed a graph
        toks = cupy.asarray(rng.integers(0, VOCAB, (4, 2)))
        out = {}
        for name, m in (("plain", plain), ("nccl", model)):
            cache = m.new_cache(2, 16)
            steps = [m.prefill(cupy.asarray(ids), cache, True)] + [m.decode_step(toks[t], cache, True) for t in range(4)]
            out[name] = cupy.stack(steps).get().astype(np.float32)
        np.testing.assert_array_equal(out["nccl"], out["plain"])


@pytest.mark.gpu
def test_gpu_launcher_one_rank_through_nccl(tmp_path):
    """``llama --tp`` with one rank: the spawned process, NCCL, the graphs with their all-reduces
    and rank 0's report."""
    from quickcupy.distributed import NcclUnavailable, unique_id
    try:
        uid = unique_id()
    except NcclUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "tp.json"
    args = build_parser().parse_args(["llama", "--preset", "tiny", "--vocab", "512", "--batch", "1,2", "--prompt", "8",
                                      "--gen", "4", "--backends", "dense,quick", "--json", str(out)])
    s = dataclasses.replace(llama_bench.settings(args), tp=1)
    assert llama_tp.launch(s, 1, uid) == 0
    report = json.loads(out.read_text())
    assert report["tp"] == 1 and report["shard"]["num_key_value_heads"] == TINY.num_key_value_heads
    assert {(g["backend"], g["batch"]) for g in report["generation"]} == {("dense", 1), ("dense", 2), ("quick", 1),
                                                                          ("quick", 2)}
    assert all(g["decode_tokens_per_s"] > 0 for g in report["generation"])
    step = report["decode_step_batch1"]["quick"]
    assert step["all_reduce_us_per_layer"] > 0 and step["gemm_us_per_layer"] > 0


def test_backend_weights_quantize_once_for_the_4bit_backends():
    """The --vocab and --tp runners' shared loop: numpy skipped, the float layer for fp16, one
    quantization (at first need) shared by awq, quick and auto."""
    from quickcupy.tools.llama_bench import backend_weights

    class Layer:
        calls = 0

        def quantized(self, group_size):
            Layer.calls += 1
            return ("q", group_size)

    class Quiet:
        def note(self, text):
            pass

    layer = Layer()
    got = list(backend_weights(["numpy", "fp16", "awq", "quick", "auto"], layer, 64, Quiet()))
    assert [b for b, _ in got] == ["fp16", "awq", "quick", "auto"]
    assert got[0][1] is layer and all(w == ("q", 64) for _, w in got[1:]) and Layer.calls == 1
