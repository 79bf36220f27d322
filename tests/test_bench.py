"""Tests of quickcupy.tools.bench (and bench_report): parsing, floor arithmetic, table formatting, the no-GPU path (CPU);
a tiny real sweep (GPU)."""
import csv
import io
import json
import math
import sys

import pytest

from quickcupy.tools import bench, bench_report, timing
from quickcupy.tools.common import Progress, UsageError, parse_ms, parse_shapes
from quickcupy.__main__ import main

TINY = ["--shapes", "1024x1024", "--m", "1,16", "--warmup", "2", "--repeats", "5", "--quiet"]


def _no_gpu(monkeypatch, reason="test machine without GPU"):
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: reason)


# ------------------------------------------------------------------------------------- parsing
def test_parse_shapes():
    assert parse_shapes("8192x8192,4096X12288") == [(8192, 8192), (4096, 12288)]
    assert parse_shapes(" 4096x4096 ") == [(4096, 4096)]


@pytest.mark.parametrize("text", ["8192", "8192x", "x8192", "8192by8192", "0x128", "4096x4096x2",
                                  "-128x128", "", "128x128,", "128x128,128x128"])
def test_parse_shapes_rejects(text):
    with pytest.raises(ValueError, match="--shapes"):
        parse_shapes(text)


def test_parse_ms_and_kernels():
    assert parse_ms("1,16,128") == [1, 16, 128]
    for bad in ("0", "-4", "a", "1,,2"):
        with pytest.raises(ValueError, match="--m"):
            parse_ms(bad)


def test_models_expand_to_their_fused_gemm_shapes():
    from quickcupy.__main__ import build_parser
    args = build_parser().parse_args(["bench", "--models", "llama3-8b,mistral-7b"])
    s = bench.settings(args)
    assert s.shapes == ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))   # mistral-7b adds none
    args = build_parser().parse_args(["bench", "--shapes", "1024x1024", "--models", "qwen2.5-7b"])
    assert bench.settings(args).shapes[:2] == ((1024, 1024), (3584, 4608))
    with pytest.raises(UsageError, match="--models: unknown 'gpt2'"):
        bench.settings(build_parser().parse_args(["bench", "--models", "gpt2"]))


def test_points_carry_achieved_bandwidth():
    raw = [{"K": 4096, "N": 4096, "M": 1, "group_size": 128, "kernel": "quick", "time_s": 10e-6}]
    p = bench_report.derive_points(raw, 3e12)[0]
    assert p["gb_per_s"] == pytest.approx(p["bytes"] / 10e-6 / 1e9)
    assert p["pct_of_copy_bw"] == pytest.approx(100 / p["time_over_floor"])


def test_available_kernels_are_fp16_then_the_registry():
    from quickcupy.gemm import KERNELS
    assert bench.AVAILABLE == ("fp16", *KERNELS)


@pytest.mark.parametrize("argv, words", [
    (["--shapes", "8192by8192"], "--shapes"),
    (["--shapes", "100x128"], "in_features=100 is not a multiple of group_size=128"),
    (["--group-size", "48"], "group_size=48 is not supported"),
    (["--group-size", "16"], "group_size=16 is not supported"),
    (["--group-size", "abc"], "--group-size"),
    (["--m", "0"], "--m=0 must be >= 1"),
    (["--m", "1,x"], "--m"),
    (["--kernels", "fp16,bogus"], "unknown 'bogus'"),
    (["--repeats", "0"], "--repeats=0"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, words):
    assert main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert words in lines[0] and "error" in lines[0]


def test_plot_without_matplotlib_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # makes "import matplotlib" fail
    assert main(["bench", *TINY, "--plot", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib" in err[0]


# ---------------------------------------------------------------------------- floor arithmetic
def test_moved_bytes_int4_and_fp16():
    K = N = 8192
    int4 = K * N // 2 + (K // 128) * N * 2 + (K // 128) * N // 2
    assert bench_report.weight_bytes("quick", K, N, 128) == int4
    assert bench_report.moved_bytes("quick", 16, K, N, 128) == int4 + 16 * K * 2 + 16 * N * 2
    assert bench_report.moved_bytes("awq", 16, K, N, 128) == bench_report.moved_bytes("quick", 16, K, N, 128)
    assert bench_report.moved_bytes("fp16", 16, K, N, 128) == K * N * 2 + 16 * K * 2 + 16 * N * 2
    # group_size -1: one group per row of the weight (K // G = 1)
    assert bench_report.weight_bytes("quick", 4096, 64, -1) == 4096 * 64 // 2 + 64 * 2 + 64 // 2


def test_floor_matches_reference_table():
    # the floors of the outside-kernel table in BENCHMARKS.md: K = N = 8192, group 128, 3.0 TB/s copy
    # bandwidth -> 11.6 us at M=1, 22.7 at M=1024
    assert bench_report.floor_seconds("quick", 1, 8192, 8192, 128, 3.0e12) * 1e6 == pytest.approx(11.6, rel=0.01)
    assert bench_report.floor_seconds("quick", 1024, 8192, 8192, 128, 3.0e12) * 1e6 == pytest.approx(22.7, rel=0.01)
    assert bench_report.flops(2, 3, 5) == 60


def test_rotation_copies_exceed_twice_l2():
    l2 = 50 * 2 ** 20
    for layer in (2 ** 10, 5 * 2 ** 20, 34 * 2 ** 20, 49 * 2 ** 20, 50 * 2 ** 20, 128 * 2 ** 20):
        n = bench_report.rotation_copies(layer, l2)
        assert n >= 2 and n * layer > 2 * l2
        assert n == 2 or (n - 1) * layer <= 2 * l2          # no more copies than needed


def _raw(kernel, M, t_us, K=1024, N=2048, G=128):
    return {"K": K, "N": N, "M": M, "group_size": G, "kernel": kernel, "time_s": t_us * 1e-6,
            "time_min_s": t_us * 0.9e-6, "copies": 3, "max_rel_err": 1e-3}


def test_derive_points():
    raw = [_raw("fp16", 1, 20.0), _raw("awq", 1, 40.0), _raw("quick", 1, 10.0), _raw("quick", 4, 12.0)]
    bw = 2.0e12
    points = bench_report.derive_points(raw, bw)
    assert [set(p) for p in points] == [set(bench_report.POINT_FIELDS)] * 4
    quick = points[2]
    K, N, M = 1024, 2048, 1
    assert quick["time_us"] == pytest.approx(10.0)
    assert quick["tflops"] == pytest.approx(2 * M * N * K / 10e-6 / 1e12)
    assert quick["speedup_vs_awq"] == pytest.approx(4.0)
    assert quick["speedup_vs_fp16"] == pytest.approx(2.0)
    assert points[1]["speedup_vs_awq"] == pytest.approx(1.0)
    assert points[0]["speedup_vs_awq"] == pytest.approx(2.0)
    floor = bench_report.moved_bytes("quick", M, K, N, 128) / bw
    assert quick["floor_us"] == pytest.approx(floor * 1e6)
    assert quick["time_over_floor"] == pytest.approx(10e-6 / floor)
    assert quick["bound_tflops"] == pytest.approx(2 * M * N * K / floor / 1e12)
    assert points[0]["bytes"] == bench_report.moved_bytes("fp16", M, K, N, 128)
    assert points[3]["speedup_vs_awq"] is None and points[3]["speedup_vs_fp16"] is None


def test_derive_points_stream_time():
    raw = [dict(_raw("quick", 1, 10.0), stream_s=6e-6), _raw("quick", 4, 12.0)]
    points = bench_report.derive_points(raw, 2.0e12)
    floor = bench_report.moved_bytes("quick", 1, 1024, 2048, 128) / 2.0e12
    assert points[0]["stream_us"] == pytest.approx(6.0)
    assert points[0]["stream_over_floor"] == pytest.approx(6e-6 / floor)
    assert points[1]["stream_us"] is None and points[1]["stream_over_floor"] is None
    assert "stream/floor" in bench_report.format_table(points)
    assert "stream/floor" not in bench_report.format_table(bench_report.derive_points(raw[1:], 2.0e12))


def test_derive_points_graph_time():
    raw = [dict(_raw("quick", 1, 10.0), graph_s=5e-6), dict(_raw("fp16", 1, 20.0), graph_s=None)]
    points = bench_report.derive_points(raw, 2.0e12)
    floor = bench_report.moved_bytes("quick", 1, 1024, 2048, 128) / 2.0e12
    assert points[0]["graph_us"] == pytest.approx(5.0)
    assert points[0]["graph_over_floor"] == pytest.approx(5e-6 / floor)
    assert points[1]["graph_us"] is None
    table = bench_report.format_table(points)
    assert "graph/floor" in table
    assert "graph/floor" not in bench_report.format_table(bench_report.derive_points([_raw("quick", 1, 10.0)], 2e12))


# ----------------------------------------------------------------------------------- formatting
def test_format_table():
    raw = [_raw(k, m, t) for m in (1, 16) for k, t in (("fp16", 20.0), ("awq", 40.0), ("quick", 10.0))]
    raw.append(_raw("quick", 1, 300.0, K=4096, N=4096))
    text = bench_report.format_table(bench_report.derive_points(raw, 3e12))
    lines = text.splitlines()
    assert lines[0] == "K=1024 N=2048 group_size=128"
    for title in ("time us", "TFLOP/s", "x fp16", "x awq", "time/floor"):
        assert title in lines[1]
    assert lines[2].split()[:4] == ["M", "|", "fp16", "awq"]
    assert lines[3].split()[0] == "1" and lines[4].split()[0] == "16"
    assert "4.00" in lines[3]                     # quick over awq
    assert "K=4096 N=4096 group_size=128" in text
    assert lines[-1].split()[0] == "1" and "-" in lines[-1].split()   # fp16, awq not run there
    assert len({len(line) for line in lines[2:5]}) == 1               # aligned columns


def test_format_table_without_baselines():
    text = bench_report.format_table(bench_report.derive_points([_raw("quick", 1, 10.0)], 3e12))
    assert "x fp16" not in text and "x awq" not in text and "time/floor" in text
    assert bench_report.format_table([]) == "(no points)"


def test_format_header():
    result = {"command": "python -m quickcupy bench --m 1", "versions": {"cupy": "14.2.0"},
              "device": {"available": True, "name": "GPU X", "driver": "1.2", "sm_clock_mhz": 1980},
              "bandwidth": {"bytes": 2 ** 29, "time_us": 180.0, "bytes_per_s": 3e12, "gb_per_s": 3000.0},
              "clocks": [{"K": 8, "N": 16, "sm_clock_mhz": 1755, "mem_clock_mhz": None, "temperature_c": 60}]}
    text = bench_report.format_header(result)
    assert "python -m quickcupy bench --m 1" in text and "name=GPU X" in text
    assert "sm_clock_mhz=1980" in text and "3000 GB/s" in text and "cupy=14.2.0" in text
    assert "8x16: sm_clock_mhz=1755, temperature_c=60" in text


def test_write_csv(tmp_path):
    points = bench_report.derive_points([_raw("fp16", 1, 20.0), _raw("quick", 1, 10.0)], 3e12)
    path = tmp_path / "bench.csv"
    bench_report.write_csv(path, points, "GPU X")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[1]["kernel"] == "quick" and rows[1]["device"] == "GPU X"
    assert rows[1]["speedup_vs_awq"] == ""
    assert float(rows[1]["time_us"]) == pytest.approx(10.0)


def test_write_plot(tmp_path):
    pytest.importorskip("matplotlib")
    raw = [_raw(k, m, t * m ** 0.5) for m in (1, 16, 256) for k, t in (("fp16", 20.0), ("awq", 40.0), ("quick", 10.0))]
    raw += [_raw("quick", m, 30.0, K=4096, N=4096) for m in (1, 16)]
    result = {"points": bench_report.derive_points(raw, 3e12), "bandwidth": {"bytes_per_s": 3e12},
              "device": {"name": "GPU X"}}
    path = tmp_path / "bench.png"
    bench_report.write_plot(path, result)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_without_terminal_prints_notes_only():
    stream = io.StringIO()
    progress = Progress("bench", 3, stream=stream)
    progress.note("K=1 N=2")
    progress.step("a")
    progress.close("1 points")
    lines = stream.getvalue().splitlines()
    assert lines == ["bench: K=1 N=2", "bench: 1 points"]
    quiet = io.StringIO()
    Progress("bench", 1, enabled=False, stream=quiet).note("hidden")
    assert quiet.getvalue() == ""


def test_progress_on_terminal_rewrites_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    progress = Progress("bench", 2, stream=stream)
    progress.step("K=1 N=2 M=1 quick")
    progress.step("K=1 N=2 M=2 quick")
    progress.close("2 points")
    text = stream.getvalue()
    assert "\r[1/2 " in text and "\r[2/2 " in text and text.count("\n") == 1


# --------------------------------------------------------------------------------- without GPU
def test_no_gpu_path_one_line_then_the_model(capsys, monkeypatch, tmp_path):
    _no_gpu(monkeypatch)
    path = tmp_path / "pred.json"
    assert main(["bench", "--shapes", "8192x8192,1024x1024", "--m", "1,16", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: no GPU (test machine without GPU)")
    model, host, summary = out.strip().split("\n\n")
    data = json.loads(path.read_text())
    assert data["device"]["available"] is False and len(data["predictions"]) == 16
    awq16 = next(r for r in data["predictions"] if r["kernel"] == "awq" and r["M"] == 16 and r["K"] == 8192)
    assert awq16["st_inst"] == 294_912                 # AutoAWQ's measured count (gpu.md)
    assert data["schema"] == bench_report.SCHEMA and data["command"]
    assert data["host"][0]["K"] == 8192 and data["host"][0]["quantize_s"] > 0
    # the short table: the first shape, a row per kernel, a column per M, predicted conflicts per launch
    title, header, *rows = model.splitlines()
    assert title.startswith("bank-conflict model at K=8192 N=8192") and header.split() == ["kernel", "M=1", "M=16"]
    conflicts = {r.split()[0]: [int(v) for v in r.split()[1:]] for r in rows}
    assert list(conflicts) == ["awq", "quick", "quick_m16", "quick_sm90"]
    assert conflicts["awq"][1] == sum(v for k, v in awq16.items() if k.endswith("_conflicts")) > 0
    assert conflicts["quick"] == [0, 0]
    assert host.splitlines()[1].split() == ["K", "N", "quantize_s", "pack_awq_s", "pack_quick_s"]
    # one summary line, its numbers those of the predictions
    quick16 = next(r for r in data["predictions"] if r["kernel"] == "quick" and r["M"] == 16 and r["K"] == 8192)
    assert "\n" not in summary and summary.startswith("no CUDA device, nothing timed")
    assert "predictions for 16 launches (kernels x M values x shapes: 4 x 2 x 2)" in summary
    assert summary.endswith(f"at K=8192 N=8192 M=16 quick executes {quick16['st_inst']} st.shared (0 bank "
                            f"conflicts), awq 294912 ({conflicts['awq'][1]})")


def test_no_gpu_path_verbose_prints_every_counter(capsys, monkeypatch):
    _no_gpu(monkeypatch)
    assert main(["bench", "--shapes", "8192x8192", "--m", "1,4", "--kernels", "awq,quick", "--verbose"]) == 0
    model, host, summary = capsys.readouterr().out.strip().split("\n\n")
    rows = model.splitlines()
    assert rows[0].split()[:7] == ["K", "N", "M", "kernel", "tile_m", "split_k", "st_inst"]
    assert len(rows) == 1 + 2 * 2 and "at K=8192 N=8192 M=1 quick" in summary   # no M = 16: the first M


def test_no_gpu_path_honours_kernels_skips_shapes_and_writes_csv(capsys, monkeypatch, tmp_path):
    _no_gpu(monkeypatch)
    table = tmp_path / "pred.csv"
    argv = ["bench", "--shapes", "4096x96,4096x4000", "--m", "1", "--kernels", "awq,quick", "--csv", str(table)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "skipping awq at K=4096 N=96: ValueError: out_features=96 is not a multiple of 64" in err
    assert "skipping awq at K=4096 N=4000" in err
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [(r["N"], r["kernel"]) for r in rows] == [("96", "quick"), ("4000", "quick")]


def test_no_gpu_path_writes_no_plot(capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    _no_gpu(monkeypatch)
    plot = tmp_path / "p.png"
    assert main(["bench", "--shapes", "4096x4096", "--m", "1", "--kernels", "quick", "--plot", str(plot)]) == 0
    assert "no plot written" in capsys.readouterr().err and not plot.exists()


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_output_paths_are_checked_before_any_work(flag, capsys, tmp_path):
    assert main(["bench", *TINY, flag, str(tmp_path / "missing" / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{flag} " in err and "does not exist" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_time_gpu_positive():
    import cupy
    a = cupy.ones((1024, 1024), cupy.float16)
    t = timing.time_gpu(lambda: a @ a, warmup=2, repeats=5)
    assert math.isfinite(t) and 0 < t < 1
    samples = timing.time_gpu_samples(timing.rotating(lambda b: b * 2, [a, a.copy()]), 1, 4, queue_ahead=False)
    assert samples.shape == (4,) and (samples > 0).all()
    per_call = timing.time_gpu_stream(timing.rotating(lambda b: b * 2, [a, a.copy()]), 8)
    assert math.isfinite(per_call) and 0 < per_call < 1
    with pytest.raises(ValueError, match="calls=0"):
        timing.time_gpu_stream(lambda: None, 0)


def _check_json(path, kernels):
    data = json.loads(path.read_text())
    assert data["schema"] == bench_report.SCHEMA and data["device"]["available"] is True
    assert data["versions"]["cupy"] and "bench" in data["command"]
    assert data["bandwidth"]["gb_per_s"] > 0
    assert [(c["K"], c["N"]) for c in data["clocks"]] == [(1024, 1024)]
    points = data["points"]
    assert sorted((p["kernel"], p["M"]) for p in points) == sorted((k, m) for k in kernels for m in (1, 16))
    for p in points:
        assert set(p) == set(bench_report.POINT_FIELDS), p
        for field in bench_report.POINT_FIELDS:
            value = p[field]
            if field in ("kernel",):
                continue
            if field == "speedup_vs_awq" and "awq" not in kernels:
                assert value is None
                continue
            if field in ("graph_us", "graph_over_floor") and p["kernel"] == "fp16":
                assert value is None         # cuBLAS through CuPy cannot be captured
                continue
            assert isinstance(value, (int, float)) and math.isfinite(value), (field, p)
            assert value > 0 or (field == "max_rel_err" and value >= 0), (field, p)
        assert p["max_rel_err"] < 0.05, p
        assert p["copies"] >= 2
    return data


@pytest.mark.gpu
def test_bench_fp16_only(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert main(["bench", *TINY, "--kernels", "fp16", "--json", str(path)]) == 0
    _check_json(path, ["fp16"])
    out = capsys.readouterr().out
    assert "K=1024 N=1024 group_size=128" in out and "device:" in out


@pytest.mark.gpu
def test_bench_tiny_sweep(tmp_path, capsys):
    path, table = tmp_path / "b.json", tmp_path / "b.csv"
    kernels = ["fp16", "awq", "quick"]
    assert main(["bench", *TINY, "--kernels", ",".join(kernels), "--json", str(path), "--csv", str(table)]) == 0
    data = _check_json(path, kernels)
    assert data["skipped"] == []
    with open(table) as f:
        assert len(list(csv.DictReader(f))) == 6
    out = capsys.readouterr().out
    assert "x awq" in out and "time/floor" in out


@pytest.mark.gpu
def test_bench_skips_a_shape_a_kernel_cannot_hold(tmp_path, capsys):
    path = tmp_path / "b.json"                 # N = 96: a multiple of 32 (quick) but not of 64 (awq)
    argv = ["bench", "--shapes", "1024x96", "--m", "1,16", "--kernels", "awq,quick", "--warmup", "1",
            "--repeats", "3", "--json", str(path)]
    assert main(argv) == 0
    data = json.loads(path.read_text())
    assert {p["kernel"] for p in data["points"]} == {"quick"}
    assert {(s["kernel"], s["M"]) for s in data["skipped"]} == {("awq", 1), ("awq", 16)}
    err = capsys.readouterr().err
    assert err.count("skipping awq") == 1 and "out_features=96" in err


def test_a_kernel_the_device_cannot_run_is_skipped_with_the_reason(monkeypatch):
    """quick_sm90 off Hopper: the sweep skips it (with gemm's own message) instead of failing."""
    from quickcupy import kernels
    from quickcupy.tools.bench import shape_refusal
    monkeypatch.setattr(kernels, "unsupported_reason",
                        lambda k, d: "kernel='quick_sm90' is built for sm_90a only" if k == "quick_sm90" else None)
    assert "sm_90a" in shape_refusal("quick_sm90", 4096, 4096, device=0)
    assert shape_refusal("quick", 4096, 4096, device=0) is None
    assert shape_refusal("fp16", 4096, 4096, device=0) is None
