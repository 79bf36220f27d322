"""python -m quickcupy warmup: which instances it compiles (CPU), and that it compiles them (GPU)."""
import pytest

from quickcupy import kernels, registry
from quickcupy.__main__ import main
from quickcupy.tools import warmup


def _h100_auto(M, N, K, capturable):
    """auto's choices of the shipped H100 table at 8192 x 8192 (quick_decode, quick, quick_sm90, dequant)."""
    name = "quick_decode" if M <= 16 else "quick" if M <= 32 else "quick_sm90" if M <= 1024 or capturable \
        else "dequant"
    return registry.VARIANTS[name]


def test_gemm_instances_are_what_the_planner_launches():
    todo = warmup.gemm_instances(["auto"], [(8192, 8192)], [1, 16, 64, 4096], 128, "float16", kernels.H100,
                                 choose=_h100_auto)
    want = {(p.source, p.name, p.shared_bytes) for p in (
        kernels.plan(k, M, 8192, 8192, 128) for k, M in
        (("quick_decode", 1), ("quick_decode", 16), ("quick_sm90", 64), ("quick_sm90", 4096)))}
    assert want <= set(todo)
    assert ("dequant.cu", "dequant_quick<half>", 0) in todo            # auto at M = 4096, eager
    assert len(todo) == len(set(todo))
    for source, name, _ in todo:
        assert name in registry.SOURCES[source].instances, (source, name)


def test_instances_respect_dtype_rows_and_what_the_gpu_runs():
    bf16 = warmup.gemm_instances(["quick", "quick_decode"], [(4096, 4096)], [1, 64], 128, "bfloat16",
                                 kernels.H100)
    assert all("__nv_bfloat16" in name for _, name, _ in bf16)
    decode = kernels.plan("quick_decode", 1, 4096, 4096, 128, dtype="bfloat16").name
    assert [n for s, n, _ in bf16 if s == "quick_decode.cu"] == [decode]             # M = 64 is past its rows
    none = warmup.gemm_instances(["quick_sm90"], [(4096, 4096)], [64], 128, "float16", kernels.H100,
                                 runnable=lambda v: v.design.arch is None)
    assert none == []
    llama = warmup.llama_instances("float16")
    assert {s for s, _, _ in llama} == {"llama_ops.cu", "decode_attention.cu"}
    assert all(n in registry.SOURCES[s].instances for s, n, _ in llama)


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    from quickcupy import device
    monkeypatch.setattr(device, "no_gpu_reason", lambda: "no CUDA device found")
    assert main(["warmup", "--shapes", "1024x512", "--m", "1"]) == 2
    assert "warmup compiles for the GPU it runs on: no CUDA device found" in capsys.readouterr().err


@pytest.mark.gpu
def test_warmup_loads_every_instance(capsys):
    assert main(["warmup", "--shapes", "1024x512", "--m", "1,64", "--llama"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("warmup: ") and " instances ready in " in out[-1]
    assert main(["warmup", "--shapes", "1024x512", "--m", "1,64"]) == 0       # loaded this time
    assert "0 compiled" in capsys.readouterr().out.splitlines()[-1]
