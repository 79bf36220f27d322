"""dev/decode_probe.py's source variants (CPU): the anchors they edit are still in
cuda/quick_decode.cu exactly once, the edited sources compile (NVRTC, as the loader would), and they
are written to a temporary copy of cuda/, never into the package's."""
import os
import sys
from pathlib import Path

import pytest

from quickcupy import kernels, registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
import decode_probe

INSTANCES = ("quick_decode<16, 8, 1, 4, 0, 4, 1, half>",   # register pipeline
             "quick_decode<16, 2, 2, 4, 3, 4, 1, half>")   # shared ring


def _source():
    return (kernels.cuda_dir() / decode_probe.SOURCE).read_text()


@pytest.mark.parametrize("make, tag, marks", [
    (decode_probe.timestamped_source, "ts", ("probe_ts[0][probe_b] = probe_now()", "atomicMax(&probe_ts[1]")),
    (decode_probe.evict_moved_source, "evict", ("ld_stream16(wb + c * 32, active && rcb + c < nch_b, probe_policy)",
                                                ", c < left);")),
])
def test_variant_compiles(make, tag, marks):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    text = make(_source())
    for mark in marks:
        assert mark in text
    package = kernels.cuda_dir()
    with decode_probe.variant(tag, text) as name:
        assert kernels.cuda_dir() != package and (kernels.cuda_dir() / name).read_text() == text
        assert not (package / name).exists()
        cubin, lowered, _ = kernels.nvrtc_compile(name, "sm_90", list(INSTANCES))
    assert kernels.cuda_dir() == package and not (package / name).exists()
    assert len(cubin) > 0 and set(lowered) == set(INSTANCES)


def test_variant_restores_the_sources_folder(monkeypatch, tmp_path):
    """The variant leaves $QUICKCUPY_CUDA_DIR as it found it (set or not) and removes its copy, also
    when the run inside fails."""
    monkeypatch.delenv(kernels.CUDA_DIR_ENV, raising=False)
    package = kernels.cuda_dir()
    with pytest.raises(KeyError), decode_probe.variant("x", "// probe\n") as name:
        copy = kernels.cuda_dir()
        assert (copy / name).read_text() == "// probe\n"
        assert (copy / decode_probe.SOURCE).read_text() == (package / decode_probe.SOURCE).read_text()
        raise KeyError("inside")
    assert kernels.CUDA_DIR_ENV not in os.environ and not copy.exists()
    monkeypatch.setenv(kernels.CUDA_DIR_ENV, str(package))
    with decode_probe.variant("x", "// probe\n"):
        assert kernels.cuda_dir() != package
    assert kernels.cuda_dir() == package


def test_plain_read_compiles():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    with decode_probe.variant("plain_read", decode_probe.PLAIN_READ) as name:
        cubin, _, _ = kernels.nvrtc_compile(name, "sm_90", ["probe_plain_read", "probe_empty"])
    assert len(cubin) > 0


def test_variant_refuses_a_missing_anchor():
    with pytest.raises(RuntimeError, match="no longer has exactly one"):
        decode_probe.timestamped_source(_source().replace("using namespace qc;\n", ""))


def test_cli_parses_shapes():
    args = decode_probe.parser().parse_args(["shapes", "--block-shapes", "8:2:2:2:8:3", "--shapes", "4096x4096",
                                             "--m", "16", "--splits", "1,4"])
    assert args.block_shapes[0].chunks == 8 and args.block_shapes[0].stages == 3
    assert args.shapes == [(4096, 4096)] and args.ms == [16] and args.splits == [1, 4]


def test_launch_rule_pipeline_and_its_override():
    """quick_decode's rule: registers at M = 1 (M < RING_MIN_M), the ring from M = 2 and for M > 8;
    ``ring=`` overrides it up to M = 8 (what the probe's 'ab' mode times) and cannot take M > 8 off it."""
    design = decode_probe.DESIGN
    stages = lambda M, **kw: kernels._plan_decode(design, M, 8192, 8192, 128, kernels.H100, **kw).shape.stages
    assert kernels.RING_MIN_M == 2
    assert stages(1) == 0 and stages(2) > 0 and stages(16) > 0
    assert stages(1, ring=True) > 0 and stages(4, ring=False) == 0 and stages(16, ring=False) > 0


def _compile_edited(tmp_path, monkeypatch, filename: str, text: str, name: str, arch: str):
    """NVRTC's (cubin, lowered names, log) of ``name`` from a copy of cuda/ (in a folder of its own)
    whose ``filename`` holds ``text``, with ptxas's report in the log."""
    import shutil
    shutil.copytree(kernels.cuda_dir(), tmp_path / "cuda")
    (tmp_path / "cuda" / filename).write_text(text)
    monkeypatch.setenv(kernels.CUDA_DIR_ENV, str(tmp_path / "cuda"))
    return kernels.nvrtc_compile(filename, arch, [name], ["--ptxas-options=-v"])


@pytest.mark.parametrize("variant", ("no-early", "no-pdl", "plain", "no-prefetch"))
def test_attention_probe_variants_compile(variant, tmp_path, monkeypatch):
    """dev/attention_probe.py's edits: each text is in cuda/decode_attention.cu once (``edited``
    raises otherwise), and the edited copy (in a folder of its own) compiles for sm_90 and differs."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    import attention_probe
    source = (kernels.cuda_dir() / "decode_attention.cu").read_text()
    text = attention_probe.edited(source, variant)
    assert text != source
    name = registry.decode_attention_instance(128, 1, False, registry.CTYPES["float16"])
    cubin, lowered, _ = _compile_edited(tmp_path, monkeypatch, "decode_attention.cu", text, name, "sm_90")
    assert len(cubin) > 0 and set(lowered) == {name}


@pytest.mark.parametrize("variant", ("issuer-0", "no-dequant", "no-wgmma"))
def test_sm90_probe_variants_compile(variant, tmp_path, monkeypatch):
    """dev/sm90_probe.py's edits of cuda/quick_sm90.cu: each text is there once (``edited`` raises
    otherwise), and the edited copy compiles for sm_90a without spills."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    import sm90_probe
    source = (kernels.cuda_dir() / "quick_sm90.cu").read_text()
    text = sm90_probe.edited(source, variant)
    assert text != source
    name = "quick_sm90<128, 256, 512, 8, 2, half>"
    cubin, lowered, log = _compile_edited(tmp_path, monkeypatch, "quick_sm90.cu", text, name, "sm_90a")
    assert len(cubin) > 0 and set(lowered) == {name}
    assert " 0 bytes spill stores" in log


@pytest.mark.parametrize("budget_mb", (16, 0))
def test_decode_l2_probe_variant_compiles_without_spills(budget_mb, tmp_path, monkeypatch):
    """dev/decode_l2_probe.py's edit of cuda/quick_decode.cu: its anchors are there once, the prefetch
    comes before both pdl_waits, and the edited copy compiles for sm_90 (the bulk prefetch) and sm_80
    (compiled out) without spills: the register pipeline, its SiLU prologue and the ring."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    import decode_l2_probe
    source = (kernels.cuda_dir() / "quick_decode.cu").read_text()
    text = decode_l2_probe.edited(source, budget_mb)
    assert text.startswith(f"#define PROBE_L2_MB {budget_mb}\n") and text.count("probe_l2_slice();\n    pdl_wait();") == 2
    names = ["quick_decode<16, 8, 1, 4, 0, 4, 1, half, 0, 0>", "quick_decode<16, 8, 1, 4, 0, 4, 1, half, 2, 0>",
             "quick_decode<16, 2, 2, 4, 3, 4, 1, half, 0, 1>"]
    _compile_edited(tmp_path, monkeypatch, "quick_decode.cu", text, names[0], "sm_90")   # the copy of cuda/
    for arch in ("sm_90", "sm_80"):
        cubin, lowered, log = kernels.nvrtc_compile("quick_decode.cu", arch, names, ["--ptxas-options=-v"])
        assert len(cubin) > 0 and set(lowered) == set(names)
        assert log.count(" 0 bytes spill stores") == log.count("bytes spill stores") >= len(names)


def test_decode_l2_probe_table_compares_bits_and_rates():
    """The probe's table: output bits against the current kernel's, medians and their ratio per batch."""
    import decode_l2_probe
    run = lambda digest, b1, b16, step: {"digests": {"4096x4096 M=1": digest},  # noqa: E731
                                         "llama": {"rates": {"1": [b1, b1 + 2], "16": [b16, None]}, "step_us": step}}
    results = {"current": [run("aa", 500, 5000, 1900), run("aa", 510, 5100, 1880)],
               "l2-16": [run("aa", 550, 5200, 1750), run("aa", 560, 5300, 1740)],
               "l2-0": [run("aa", 400, 5000, 2000), run("bb", 400, 5000, 2000)]}
    rows = decode_l2_probe.table(results, "1,16").splitlines()
    assert rows[0].startswith("current  same bits") and "x1.000" in rows[0] and "step 1890 us" in rows[0]
    assert "median 555, x1.099; GPU 557" in rows[1] and "b16: 5,200 5,300 (median 5,250, x1.040; GPU -)" in rows[1]
    assert "OUTPUT DIFFERS" in rows[2]


def test_decode_l2_probe_reads_the_llama_report(monkeypatch):
    """The child's llama run is llama_ab's (this checkout, auto only); it keeps auto's rates per batch
    and the batch-1 step."""
    import decode_l2_probe
    import llama_ab
    seen = {}

    def fake_run(checkout, args):
        seen["checkout"], seen["args"] = checkout, args
        return {"generation": [{"backend": "auto", "batch": 1, "decode_tokens_per_s": 500.0,
                                "decode_gpu_tokens_per_s": 505.0},
                               {"backend": "auto", "batch": 16, "decode_tokens_per_s": 5000.0}],
                "decode_step_batch1": {"auto": {"full_step_us": 1896.0}}}
    monkeypatch.setattr(llama_ab, "run_llama", fake_run)
    out = decode_l2_probe.llama("1,16")
    assert seen["checkout"] == decode_l2_probe.ROOT and seen["args"][seen["args"].index("--batch") + 1] == "1,16"
    assert seen["args"][seen["args"].index("--backends") + 1] == "auto"
    assert out == {"rates": {"1": [500.0, 505.0], "16": [5000.0, None]}, "step_us": 1896.0}


def test_sm90_plan_sweep_launches_and_lines():
    """dev/sm90_plan_sweep.py: the launches of tiles x splits as the plan runs them (a clamped split
    once), and a table line naming the plan's launch, the fastest and a BAD one."""
    import sm90_plan_sweep as sweep
    got = sweep.launches(256, 8192, 8192, 128, (128, 256), (1, 2, 3, 1000), kernels.H100)
    assert got[:3] == [(128, 1), (128, 2), (128, 3)] and len(got) == len(set(got)) == 8
    for tm, sk in got:
        p = kernels.plan("quick_sm90", 256, 8192, 8192, 128, tile_m=tm, split_k=sk)
        assert p.bm == tm and p.split_k == sk
    assert sweep.launches(64, 4096, 256, 128, (64,), (1, 2, 3, 8), kernels.H100) == [(64, 1), (64, 2), (64, 4)]
    row = {"plan": "256/2", "cublas_us": 54.1, "launches": {"192/1": 70.0, "256/2": 62.5, "256/3": None}}
    assert sweep.line(8192, 8192, 256, row) == ("K=8192 N=8192 M=256: plan 256/2 62.5 | best 256/2 62.5 | "
                                                "cuBLAS 54.1 | 192/1:70.0 256/2:62.5 256/3:BAD")


def test_llama_ab_alternates_and_summarizes():
    """dev/llama_ab.py: the earlier checkout runs first in even rounds, second in odd ones; the
    summary takes each side's medians and their ratio, and GPU medians only where runs have them."""
    import llama_ab
    assert [llama_ab.order(i) for i in range(3)] == [("old", "today"), ("today", "old"), ("old", "today")]

    def report(wall, gpu):
        return {"throughput": [{"backend": "quick", "batch": 256, "decode_tokens_per_s": wall,
                                "decode_gpu_tokens_per_s": gpu},
                               {"backend": "numpy", "batch": 1, "decode_tokens_per_s": wall / 100}]}
    runs = {"old": [llama_ab.rates(report(w, w + 1)) for w in (100.0, 300.0, 200.0)],
            "today": [llama_ab.rates(report(w, None)) for w in (110.0, 210.0, 250.0)]}
    rows = {(r[0], r[1]): r for r in llama_ab.summary(runs)}
    quick = rows[("quick", 256)]
    assert quick[2] == [100.0, 300.0, 200.0] and quick[3] == [110.0, 210.0, 250.0]
    assert quick[4:7] == (200.0, 210.0, 1.05) and quick[7] == 201.0 and quick[8] is None
    assert rows[("numpy", 1)][7] is None
    text = llama_ab.table(llama_ab.summary(runs))
    assert "1.050" in text and "200 ->       210" in text
    # a whole model's report (--vocab, --checkpoint) keeps its runs under "generation"
    whole = {"generation": report(100.0, 99.0)["throughput"], "decode_step_batch1": {}}
    assert llama_ab.rates(whole) == {("quick", 256): (100.0, 99.0), ("numpy", 1): (1.0, None)}


def test_llama_ab_runs_two_checkouts(tmp_path, capsys):
    """dev/llama_ab.py end to end on the CPU (the llama tool's NumPy backend, a tiny model): this
    checkout against a copy of its quickcupy/ and cuda/ as the earlier one, two rounds."""
    import shutil

    import llama_ab
    root = Path(__file__).resolve().parents[1]
    old = tmp_path / "old"
    for name in ("quickcupy", "cuda"):
        shutil.copytree(root / name, old / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert llama_ab.main(["--old", str(old), "--rounds", "2", "--", "--preset", "tiny", "--backends", "numpy",
                          "--layers", "1", "--batch", "1", "--prompt", "4", "--gen", "2", "--check-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 rounds" in out and "  numpy      1  " in out


def test_llama_ab_refuses_a_folder_without_a_checkout(tmp_path):
    import llama_ab
    with pytest.raises(SystemExit):
        llama_ab.main(["--old", str(tmp_path), "--", "--preset", "tiny"])


def test_bench_ab_alternates_and_summarizes(tmp_path, monkeypatch, capsys):
    """dev/bench_ab.py: llama_ab's alternation over two checkouts' bench JSON (run_tool stubbed), the
    points every run has, per point the medians and old / today (above 1: today faster)."""
    import bench_ab
    import llama_ab
    old = tmp_path / "old"
    for name in ("quickcupy", "cuda"):
        (old / name).mkdir(parents=True)
    calls = []
    old_times = iter([40.0, 44.0])
    new_times = iter([30.0, 34.0])

    def fake(checkout, tool, args):
        side = "old" if checkout == old.resolve() else "today"
        calls.append((side, tool, tuple(args)))
        t = next(old_times if side == "old" else new_times)
        points = [{"K": 8192, "N": 8192, "M": 64, "kernel": "quick_sm90", "time_us": t},
                  {"K": 8192, "N": 8192, "M": 64, "kernel": "fp16", "time_us": 50.0},
                  {"K": 8192, "N": 8192, "M": 1, "kernel": "quick_sm90", "time_us": None}]
        if side == "today":
            points.append({"K": 4096, "N": 4096, "M": 64, "kernel": "quick_sm90", "time_us": 9.0})
        return {"points": points}
    monkeypatch.setattr(llama_ab, "run_tool", fake)
    assert bench_ab.main(["--old", str(old), "--", "--m", "64", "--kernels", "fp16,quick_sm90"]) == 0
    assert [c[0] for c in calls] == [s for i in range(2) for s in llama_ab.order(i)]
    assert {c[1:] for c in calls} == {("bench", ("--m", "64", "--kernels", "fp16,quick_sm90"))}
    out = capsys.readouterr().out
    rows = {r[3]: r for r in bench_ab.summary({"old": [{(1, 1, 1, "k"): 40.0}, {(1, 1, 1, "k"): 44.0}],
                                              "today": [{(1, 1, 1, "k"): 30.0}, {(1, 1, 1, "k"): 34.0}]})}
    assert rows["k"][6:] == (42.0, 32.0, 42.0 / 32.0)
    assert "quick_sm90" in out and "1.312" in out and "4096x4096" not in out and "1.000" in out
    with pytest.raises(SystemExit):
        bench_ab.main(["--old", str(tmp_path / "none"), "--", "--m", "64"])


def test_dequant_fold_error_separates_the_exact_way_from_the_fold():
    """dev/dequant_fold_error.py: the kernels' sub-then-multiply rounds (n - z) s once (at most 15
    half-ulps of 2^-10 relative, 0.0074 of the scale), while one fma against a precomputed
    -(1024 + z) s is off by far more (its constant rounded near 1024 s)."""
    import dequant_fold_error
    err = dequant_fold_error.errors(20000, seed=1)
    exact = [v for k, v in err.items() if "then mul" in k]
    folds = [v for k, v in err.items() if k.startswith("one fma")]
    assert len(exact) == len(folds) == 2
    assert all(mx <= 15 * 2.0 ** -11 for mx, _ in exact)
    assert all(mx > 0.2 for mx, _ in folds)
