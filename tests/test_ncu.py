"""``python -m quickcupy ncu``: ncu CSV parsing, attribution of launches to GEMM calls, the command
line (with a fake ncu), and (GPU + ncu) one real run."""
import json
import math
import os
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from quickcupy import kernels, registry
from quickcupy.tools import ncu
from quickcupy.__main__ import main
from test_kernels import needs_nvrtc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
import ldgsts_probe  # dev/ldgsts_probe.py, outside the package

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
AWQ = ("void awq_gemm<16, 128>(const __half *, const int *, const int *, const __half *, "
       "const __half *, __half *, float *, int, int, int, int, int)")
QUICK = ("void quick_gemm<16, 4, 4, 3>(const __half *, const uint4 *, const unsigned short *, "
         "const uint2 *, const __half *, __half *, float *, int, int, int, int, int)")
REDUCE = "splitk_reduce"

# What ncu --csv printed for a child that made 2 awq calls (GEMM + split-K reduce each) and 2 quick
# calls (no split), 3 metrics each; the first of each pair is the warm-up. One time is in usecond.
SAMPLE = textwrap.dedent(f'''\
    ==PROF== Connected to process 41872 (/usr/bin/python3.12)
    ==PROF== Profiling "awq_gemm" - 0: 0%....50%....100% - 9 passes
    ==PROF== Profiling "splitk_reduce" - 1: 0%....50%....100% - 9 passes
    ==PROF== Profiling "awq_gemm" - 2: 0%....50%....100% - 9 passes
    ==PROF== Profiling "splitk_reduce" - 3: 0%....50%....100% - 9 passes
    ==PROF== Profiling "quick_gemm" - 4: 0%....50%....100% - 9 passes
    ==PROF== Profiling "quick_gemm" - 5: 0%....50%....100% - 9 passes
    ==PROF== Disconnected from process 41872
    {HEADER}
    "0","41872","python3.12","127.0.0.1","{AWQ}","1","7","(64, 1, 1)","(1, 64, 8)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","72,416"
    "0","41872","python3.12","127.0.0.1","{AWQ}","1","7","(64, 1, 1)","(1, 64, 8)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum","","131,072"
    "0","41872","python3.12","127.0.0.1","{AWQ}","1","7","(64, 1, 1)","(1, 64, 8)","0","9.0","Command line profiler metrics","smsp__sass_inst_executed_op_shared_st.sum","inst","294,912"
    "1","41872","python3.12","127.0.0.1","{REDUCE}","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","3,104"
    "1","41872","python3.12","127.0.0.1","{REDUCE}","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum","","0"
    "1","41872","python3.12","127.0.0.1","{REDUCE}","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","smsp__sass_inst_executed_op_shared_st.sum","inst","0"
    "2","41872","python3.12","127.0.0.1","{AWQ}","1","7","(64, 1, 1)","(1, 64, 8)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","70.21"
    "2","41872","python3.12","127.0.0.1","{AWQ}","1","7","(64, 1, 1)","(1, 64, 8)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum","","131,072"
    "2","41872","python3.12","127.0.0.1","{AWQ}","1","7","(64, 1, 1)","(1, 64, 8)","0","9.0","Command line profiler metrics","smsp__sass_inst_executed_op_shared_st.sum","inst","294,912"
    "3","41872","python3.12","127.0.0.1","{REDUCE}","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","2,990"
    "3","41872","python3.12","127.0.0.1","{REDUCE}","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum","","0"
    "3","41872","python3.12","127.0.0.1","{REDUCE}","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0","Command line profiler metrics","smsp__sass_inst_executed_op_shared_st.sum","inst","0"
    "4","41872","python3.12","127.0.0.1","{QUICK}","1","7","(128, 1, 1)","(1, 64, 4)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","41,120"
    "4","41872","python3.12","127.0.0.1","{QUICK}","1","7","(128, 1, 1)","(1, 64, 4)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum","","0"
    "4","41872","python3.12","127.0.0.1","{QUICK}","1","7","(128, 1, 1)","(1, 64, 4)","0","9.0","Command line profiler metrics","smsp__sass_inst_executed_op_shared_st.sum","inst","32,768"
    "5","41872","python3.12","127.0.0.1","{QUICK}","1","7","(128, 1, 1)","(1, 64, 4)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","41,008"
    "5","41872","python3.12","127.0.0.1","{QUICK}","1","7","(128, 1, 1)","(1, 64, 4)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum","","0"
    "5","41872","python3.12","127.0.0.1","{QUICK}","1","7","(128, 1, 1)","(1, 64, 4)","0","9.0","Command line profiler metrics","smsp__sass_inst_executed_op_shared_st.sum","inst","32,768"
    ''')


def sample_calls(M=16, N=8192, K=8192, group_size=128):
    """The child's manifest entries matching SAMPLE: per kernel one warm-up, then one call."""
    return [{"kernel": k, "layout": k, "M": M, "N": N, "K": K, "group_size": group_size,
             "repeat": rep, "warmup": rep < 0} for k in ("awq", "quick") for rep in (-1, 0)]


NVTX_COLUMNS = ('"thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg",'
                '"Id:Domain:Start/Stop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg",')


def nvtx_cell(pid, ranges):
    """ncu's push/pop cell for open ranges (outermost first), as it appears in the CSV."""
    return f"{pid}  " + "  ".join(f'""<default domain>:{r}:none:none:none:none:none:none""' for r in ranges) + " "


def csv_for(launches, pid=41872, ranges=None):
    """ncu --csv text for [(kernel name, {metric: value})], every metric of ncu.METRICS present;
    with ``ranges`` (one tuple of open NVTX ranges per launch) the two NVTX columns of ncu --nvtx."""
    header = HEADER.replace('"Kernel Name"', NVTX_COLUMNS + '"Kernel Name"') if ranges else HEADER
    lines = [f"==PROF== Connected to process {pid} (/usr/bin/python3)", header]
    for i, (name, values) in enumerate(launches):
        nvtx = f'"{nvtx_cell(pid, ranges[i])}","",' if ranges else ""
        for metric in ncu.METRIC_NAMES:
            unit = "nsecond" if metric.startswith("gpu__time") else ("inst" if "inst" in metric else "")
            lines.append(f'"{i}","{pid}","python3","host",{nvtx}"{name}","1","7","(64, 1, 1)","(1, 64, 8)",'
                         f'"0","9.0","Command line profiler metrics","{metric}","{unit}",'
                         f'"{values.get(metric, 0):,}"')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- parsing
def test_parse_sample():
    launches = ncu.parse_ncu_csv(SAMPLE)
    assert [l.id for l in launches] == [0, 1, 2, 3, 4, 5]
    assert [l.name for l in launches] == [AWQ, REDUCE, AWQ, REDUCE, QUICK, QUICK]
    first = launches[0]
    assert first.process_id == "41872"
    assert first.block_size == "(64, 1, 1)" and first.grid_size == "(1, 64, 8)"
    assert first.metrics["smsp__sass_inst_executed_op_shared_st.sum"] == 294_912
    assert first.metrics["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"] == 131_072
    assert first.metrics["gpu__time_duration.sum"] == 72_416
    assert first.units["gpu__time_duration.sum"] == "nsecond"
    # 70.21 usecond becomes nanoseconds.
    assert launches[2].metrics["gpu__time_duration.sum"] == pytest.approx(70_210)
    assert launches[2].units["gpu__time_duration.sum"] == "nsecond"


def test_parse_orders_by_id_and_ignores_other_lines():
    lines = SAMPLE.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    rows = lines[header + 1:]
    shuffled = lines[:header + 1] + ["child output line", "==WARNING== something"] + rows[::-1]
    launches = ncu.parse_ncu_csv("\n".join(shuffled))
    assert [l.id for l in launches] == [0, 1, 2, 3, 4, 5]


def test_parse_errors():
    with pytest.raises(ValueError, match="no ncu CSV header"):
        ncu.parse_ncu_csv("==PROF== Connected to process 1\n==WARNING== No kernels were profiled.\n")
    with pytest.raises(ValueError, match="fields"):
        ncu.parse_ncu_csv(HEADER + '\n"0","1","python"\n')
    with pytest.raises(ValueError, match="lacks column"):
        ncu.parse_ncu_csv('"ID","Process ID","Kernel Name"\n')


@pytest.mark.parametrize("text, unit, expected", [
    ("1,234,567", "inst", (1_234_567.0, "inst")),
    ("0", "", (0.0, "")),
    ("70.21", "usecond", (70_210.0, "nsecond")),
    ("1.5", "msecond", (1_500_000.0, "nsecond")),
    ("2.5", "Kinst", (2_500.0, "inst")),
    ("3", "Mbyte", (3_000_000.0, "byte")),
    ("12", "%", (12.0, "%")),
])
def test_parse_value(text, unit, expected):
    value, base = ncu.parse_value(text, unit)
    assert (pytest.approx(value), base) == expected


def test_parse_value_not_available_and_garbage():
    assert math.isnan(ncu.parse_value("n/a", "")[0])
    with pytest.raises(ValueError, match="not a number"):
        ncu.parse_value("lots", "inst")


# ---------------------------------------------------------------------------------- attribution
def test_group_calls_adds_the_reduce_to_its_gemm():
    grouped = ncu.group_calls(ncu.parse_ncu_csv(SAMPLE), sample_calls())
    assert [len(g) for _, g in grouped] == [2, 2, 1, 1]
    assert [c["kernel"] for c, _ in grouped] == ["awq", "awq", "quick", "quick"]
    assert grouped[1][1][1].name == REDUCE


def test_group_calls_mismatches_are_one_line_errors():
    launches = ncu.parse_ncu_csv(SAMPLE)
    with pytest.raises(ncu.NcuError, match="reported 4 GEMM launch.*made 3 GEMM call"):
        ncu.group_calls(launches, sample_calls()[:3])
    calls = sample_calls()
    calls[0]["layout"] = calls[0]["kernel"] = "quick"
    with pytest.raises(ncu.NcuError, match="launch 0 is .*awq_gemm.*kernel=quick"):
        ncu.group_calls(launches, calls)


def test_summarize_sums_launches_and_leaves_out_warmup():
    results = ncu.summarize(ncu.group_calls(ncu.parse_ncu_csv(SAMPLE), sample_calls()))
    assert len(results) == 1
    entry = results[0]
    assert (entry["M"], entry["N"], entry["K"], entry["group_size"]) == (16, 8192, 8192, 128)
    awq, quick = entry["kernels"]["awq"], entry["kernels"]["quick"]
    assert awq["calls"] == quick["calls"] == 1
    assert awq["metrics"]["gpu__time_duration.sum"] == pytest.approx(70_210 + 2_990)
    assert awq["metrics"]["smsp__sass_inst_executed_op_shared_st.sum"] == 294_912
    assert quick["metrics"]["gpu__time_duration.sum"] == 41_008
    assert awq["launch_names"] == [AWQ, REDUCE]
    assert quick["launch_names"] == [QUICK]
    # Metrics ncu did not report are NaN, not zero.
    assert math.isnan(awq["metrics"]["smsp__sass_inst_executed_op_ldsm.sum"])


def test_summarize_takes_the_median_over_repeats():
    calls = [{"kernel": "quick", "layout": "quick", "M": 1, "N": 64, "K": 64, "group_size": 32,
              "repeat": r, "warmup": False} for r in range(3)]
    times = [30, 10, 20]
    launches = ncu.parse_ncu_csv(csv_for([(QUICK, {"gpu__time_duration.sum": t}) for t in times]))
    entry = ncu.summarize(ncu.group_calls(launches, calls))[0]
    assert entry["kernels"]["quick"]["metrics"]["gpu__time_duration.sum"] == 20
    assert [c["gpu__time_duration.sum"] for c in entry["kernels"]["quick"]["per_call"]] == times


# ----------------------------------------------------------------------------------- ncu itself
def test_ncu_command_line():
    cmd = ncu.ncu_command("/x/ncu", ["python", "-m", "quickcupy.tools.ncu", "--child"])
    assert cmd[0] == "/x/ncu"
    assert cmd[cmd.index("--clock-control") + 1] == "none"
    assert cmd[cmd.index("--target-processes") + 1] == "all"
    assert cmd[cmd.index("--kernel-name") + 1] == f"regex:{ncu.KERNEL_REGEX}"
    assert "splitk_reduce" in ncu.KERNEL_REGEX.split("|")
    assert cmd[cmd.index("--metrics") + 1].split(",") == list(ncu.METRIC_NAMES)
    assert "--csv" in cmd and "--export" not in cmd and "--section" not in cmd
    # Only launches inside the child's root NVTX range (a push/pop range: trailing "/").
    assert cmd[cmd.index("--nvtx-include") + 1] == "quickcupy_ncu/" and "--nvtx" in cmd
    assert cmd[-4:] == ["python", "-m", "quickcupy.tools.ncu", "--child"]
    cmd = ncu.ncu_command("/x/ncu", ["child"], report="r.ncu-rep", nvtx=False, lineinfo=True)
    assert "--nvtx" not in cmd and "--csv" not in cmd
    assert cmd[cmd.index("--export") + 1] == "r.ncu-rep" and "--force-overwrite" in cmd
    assert cmd[cmd.index("--section") + 1] == "SourceCounters"
    assert cmd[cmd.index("--import-source") + 1] == "yes"
    assert cmd[-1] == "child"


def test_import_and_source_commands():
    assert ncu.import_command("ncu", "r.ncu-rep") == [
        "ncu", "--import", "r.ncu-rep", "--csv", "--print-units", "base", "--page", "details"]
    cmd = ncu.source_command("ncu", "r.ncu-rep", "awq_gemm", 3)
    assert cmd[cmd.index("--page") + 1] == "source" and cmd[cmd.index("--print-source") + 1] == "cuda,sass"
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:^awq_gemm"
    assert (cmd[cmd.index("--launch-skip") + 1], cmd[cmd.index("--launch-count") + 1]) == ("3", "1")


def test_metric_list_is_one_constant():
    assert len(set(ncu.METRIC_NAMES)) == len(ncu.METRICS) == 15
    assert all(name.endswith((".sum", ".pct_of_peak_sustained_elapsed")) for name in ncu.METRIC_NAMES)


def _no_ncu_anywhere(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(ncu, "NCU_FALLBACKS", (str(tmp_path / "cuda/bin/ncu"),
                                               str(tmp_path / "nsight-compute/*/ncu")))


def _executable(path, text="#!/bin/sh\nexit 0\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_ncu_missing(monkeypatch, tmp_path):
    _no_ncu_anywhere(monkeypatch, tmp_path)
    with pytest.raises(ncu.NcuError, match="not found on PATH, in /usr/local/cuda/bin"):
        ncu.find_ncu()


def test_find_ncu_looks_in_nsight_compute_folders(monkeypatch, tmp_path):
    _no_ncu_anywhere(monkeypatch, tmp_path)
    _executable(tmp_path / "nsight-compute/2024.3.2/ncu")
    newest = _executable(tmp_path / "nsight-compute/2025.1.0/ncu")
    assert ncu.find_ncu() == str(newest)
    cuda = _executable(tmp_path / "cuda/bin/ncu")
    assert ncu.find_ncu() == str(cuda)


def test_find_ncu_explicit(tmp_path):
    exe = _executable(tmp_path / "ncu")
    assert ncu.find_ncu(str(exe)) == str(exe)
    with pytest.raises(ncu.NcuError, match="not an executable"):
        ncu.find_ncu(str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------- command line
def test_cli_missing_ncu(monkeypatch, tmp_path, capsys):
    _no_ncu_anywhere(monkeypatch, tmp_path)
    monkeypatch.setattr(ncu, "no_gpu_reason", lambda: None)
    assert main(["ncu", "--m", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("python -m quickcupy ncu: error: ncu (Nsight Compute) not found")


@pytest.mark.parametrize("argv, message", [
    (["--m", "0"], "--m=0 must be >= 1"),
    (["--m", "16,16"], "--m: '16,16' repeats an item"),
    (["--shapes", "1000x1000"], "in_features=1000 is not a multiple of group_size=128"),
    (["--shapes=-8x8"], "--shapes: '-8x8' is not KxN with two positive integers"),
    (["--shapes", "8192x0"], "--shapes: '8192x0' has a zero dimension"),
    (["--shapes", "4096x4096,8192x8192"], "ncu profiles one KxN shape per run, got 2"),
    (["--kernels", "awq,bogus"], "--kernels: unknown 'bogus'"),
    (["--group-size", "100"], "group_size=100 is not supported"),
    (["--group-size", "16"], "group_size=16 is not supported"),
    (["--repeats", "0"], "--repeats 0 must be at least 1"),
    (["--warmup", "-1"], "--warmup -1 must not be negative"),
    (["--kernel-regex", "("], "is not a regular expression"),
    (["--timeout", "0"], "--timeout 0.0 must be positive"),
    (["--ncu", "/no/such/ncu"], "--ncu /no/such/ncu does not exist"),
])
def test_cli_bad_arguments(argv, message, capsys):
    assert main(["ncu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_argument_defaults():
    from quickcupy.__main__ import build_parser
    args = build_parser().parse_args(["ncu"])
    s = ncu.settings(args)
    assert (s.kernels, s.M, s.K, s.N, s.group_size) == (("awq", "quick"), (16, 128), 8192, 8192, 128)
    assert s.kernel_regex == ncu.KERNEL_REGEX and args.func is ncu.run
    args = build_parser().parse_args(["ncu", "--m", "1,32", "--shapes", "4096x11008", "--kernels", "quick,awq"])
    s = ncu.settings(args)
    assert (s.M, s.K, s.N, s.kernels) == ((1, 32), 4096, 11008, ("quick", "awq"))


def test_cli_old_spellings_still_read(capsys):
    """--M 1 16, --K/--N and space-separated --kernels give the same settings as --m, --shapes and a
    comma list, each with one deprecation line on stderr; mixed with the new spelling they are refused."""
    from quickcupy.__main__ import build_parser
    old = ncu.settings(build_parser().parse_args(["ncu", "--M", "1", "1", "32", "--K", "4096", "--N", "11008",
                                                  "--kernels", "quick", "quick"]))
    err = capsys.readouterr().err.splitlines()
    assert err == ["python -m quickcupy ncu: --kernels quick quick is deprecated; use --kernels quick,quick",
                   "python -m quickcupy ncu: --M 1 1 32 is deprecated; use --m 1,1,32",
                   "python -m quickcupy ncu: --K 4096 --N 11008 is deprecated; use --shapes 4096x11008"]
    new = ncu.settings(build_parser().parse_args(["ncu", "--m", "1,32", "--shapes", "4096x11008",
                                                  "--kernels", "quick"]))
    assert old == new and capsys.readouterr().err == ""
    n_only = ncu.settings(build_parser().parse_args(["ncu", "-N", "4096"]))
    assert (n_only.K, n_only.N) == (8192, 4096)
    assert main(["ncu", "--K", "4096", "--shapes", "4096x4096"]) == 2
    assert "give --shapes only" in capsys.readouterr().err


def test_cli_no_gpu(monkeypatch, tmp_path, capsys):
    fake = _executable(tmp_path / "ncu")
    monkeypatch.setattr(ncu, "no_gpu_reason", lambda: "no CUDA device found")
    assert main(["ncu", "--ncu", str(fake)]) == 1
    assert "error: no GPU: no CUDA device found" in capsys.readouterr().err


FAKE_NCU = """\
#!{python}
# Stands in for ncu: prints what a real run would, and writes the child's manifest.
import os, shutil, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2025.3.1.0 (build 36398880)")
    sys.exit(0)
mode, data = os.environ["FAKE_NCU_MODE"], os.environ["FAKE_NCU_DATA"]
if mode == "perm":
    print("==PROF== Connected to process 7 (/usr/bin/python3)")
    print("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU "
          "Performance Counters on the target device 0.")
    sys.exit(1)
if mode == "metric":
    print("==ERROR== Failed to find metric l1tex__bogus.sum")
    sys.exit(1)
if mode == "child-fails":
    print("Traceback (most recent call last):\\nValueError: out_features=100 is not a multiple of 32",
          file=sys.stderr)
    sys.exit(1)
def show(name):
    sys.stdout.write(open(os.path.join(data, name)).read())
if "--import" in args:
    if "source" in args:
        show("source_" + args[args.index("--kernel-name") + 1].split("^")[-1] + ".csv")
    else:
        show("ncu.csv")
    sys.exit(0)
with open(os.path.join(data, "argv.txt"), "w") as f:
    f.write("\\n".join(args))
shutil.copy(os.path.join(data, "manifest.json"), args[args.index("--manifest") + 1])
if "--export" in args:
    open(args[args.index("--export") + 1], "w").write("report")
else:
    show("ncu.csv")
"""


@pytest.fixture
def fake_ncu(monkeypatch, tmp_path):
    """A fake ncu executable; FAKE_NCU_MODE picks its behaviour. Returns (path, data folder)."""
    exe = _executable(tmp_path / "bin/ncu", FAKE_NCU.format(python=sys.executable))
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("FAKE_NCU_DATA", str(data))
    monkeypatch.setenv("FAKE_NCU_MODE", "ok")
    monkeypatch.setattr(ncu, "no_gpu_reason", lambda: None)
    return exe, data


@pytest.mark.parametrize("mode, message", [
    ("perm", "ERR_NVGPUCTRPERM"),
    ("metric", "ncu: Failed to find metric l1tex__bogus.sum"),
    ("child-fails", "ValueError: out_features=100 is not a multiple of 32"),
])
def test_cli_ncu_failures(fake_ncu, monkeypatch, capsys, mode, message):
    exe, _ = fake_ncu
    monkeypatch.setenv("FAKE_NCU_MODE", mode)
    assert main(["ncu", "--ncu", str(exe), "--m", "16"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _write_fake_run(data, M=16, N=8192, K=8192, nvtx=True):
    """What ncu reports for one warm-up and 2 calls per kernel: with nvtx, the warm-ups are not
    profiled and each launch lists its call's NVTX ranges."""
    st, conf = "smsp__sass_inst_executed_op_shared_st.sum", \
        "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
    awq = {st: 294_912, conf: 131_072, "gpu__time_duration.sum": 70_000}
    red = {"gpu__time_duration.sum": 3_000}
    quick = {st: 32_768, "gpu__time_duration.sum": 41_000}
    calls = [{"kernel": k, "layout": k, "M": M, "N": N, "K": K, "group_size": 128,
              "repeat": r, "warmup": r < 0} for k in ("awq", "quick") for r in (-1, 0, 1)]
    profiled = [c for c in calls if not (nvtx and c["warmup"])]
    launches, ranges = [], []
    for c in profiled:
        for launch in ([(AWQ, awq), (REDUCE, red)] if c["kernel"] == "awq" else [(QUICK, quick)]):
            launches.append(launch)
            ranges.append((ncu.ROOT_RANGE, ncu.call_range(c)))
    (data / "ncu.csv").write_text(csv_for(launches, ranges=ranges if nvtx else None))
    (data / "manifest.json").write_text(json.dumps(
        {"calls": calls, "device": {"available": True, "name": "NVIDIA H100 80GB HBM3",
                                    "compute_capability": "9.0"}, "versions": {}}))


def test_cli_end_to_end_with_fake_ncu(fake_ncu, tmp_path, capsys):
    exe, data = fake_ncu
    _write_fake_run(data)
    out = tmp_path / "results" / "ncu_m16.json"
    assert main(["ncu", "--ncu", str(exe), "--m", "16", "--repeats", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Version 2025.3.1.0" in text and "NVIDIA H100 80GB HBM3 (sm_90)" in text
    assert "M=16 N=8192 K=8192 group_size=128" in text
    assert "awq: 2 call(s), each summed over awq_gemm<16, 128> + splitk_reduce" in text
    assert "quick: 2 call(s), each summed over quick_gemm<16, 4, 4, 3>\n" in text
    row = next(line for line in text.splitlines() if line.startswith("  smsp__sass_inst_executed_op_shared_st"))
    # awq, quick, awq/quick, then the model's predictions for awq and quick
    assert row.split()[-5:] == ["294,912", "32,768", "9.00", "294,912", "0"]
    time_row = next(line for line in text.splitlines() if line.startswith("  gpu__time"))
    assert "[nsecond]" in time_row and "73,000" in time_row and "41,000" in time_row
    saved = json.loads(out.read_text())
    entry = saved["results"][0]
    assert entry["kernels"]["awq"]["metrics"]["gpu__time_duration.sum"] == 73_000
    assert entry["ratio"]["smsp__sass_inst_executed_op_shared_st.sum"] == 9
    assert entry["ratio"]["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"] is None  # x/0
    assert saved["kernel_regex"] == ncu.KERNEL_REGEX
    assert entry["predicted"]["awq"]["smsp__sass_inst_executed_op_shared_st.sum"] == 294_912
    # Attributed by NVTX range; the warm-ups ran outside the profiled range.
    assert saved["attribution"] == "nvtx"
    assert [l["range"] for l in saved["launches"]] == [
        f"{k} M=16 N=8192 K=8192 g=128 #{r}" for k, r in (("awq", 0), ("awq", 0), ("awq", 1), ("awq", 1),
                                                         ("quick", 0), ("quick", 1))]
    argv = (data / "argv.txt").read_text().splitlines()
    assert argv[argv.index("--nvtx-include") + 1] == "quickcupy_ncu/"
    rows = (tmp_path / "results" / "ncu_m16.csv").read_text().splitlines()
    assert rows[0] == "M,N,K,group_size,metric,label,unit,awq,quick,awq/quick,awq predicted,quick predicted"
    assert len(rows) == 1 + len(ncu.METRICS)


def test_cli_json_output(fake_ncu, capsys):
    exe, data = fake_ncu
    _write_fake_run(data)
    assert main(["ncu", "--ncu", str(exe), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"][0]["kernels"]) == {"awq", "quick"}


def test_predictions_hook_adds_columns(fake_ncu, monkeypatch, capsys):
    exe, data = fake_ncu
    _write_fake_run(data)
    assert ncu.predicted_metrics("awq", 16, 8192, 8192, 128)["smsp__sass_inst_executed_op_shared_st.sum"] == 294_912
    assert ncu.predicted_metrics("int8", 16, 8192, 8192, 128) is None

    def predictor(kernel, M, N, K, group_size):
        return {"smsp__sass_inst_executed_op_shared_st.sum": 294_912} if kernel == "awq" else None

    monkeypatch.setattr(ncu, "predicted_metrics", predictor)
    assert main(["ncu", "--ncu", str(exe)]) == 0
    text = capsys.readouterr().out
    assert "awq predicted" in text
    report = {"results": [{"M": 16, "N": 8192, "K": 8192, "group_size": 128,
                           "kernels": {"awq": {}, "quick": {}}}]}
    assert ncu.add_predictions(report, predictor)
    assert report["results"][0]["predicted"] == {"awq": {"smsp__sass_inst_executed_op_shared_st.sum": 294_912}}


def test_output_paths():
    assert ncu.output_paths("out/ncu") == ("out/ncu.csv", "out/ncu.json")
    assert ncu.output_paths("out/ncu.json") == ("out/ncu.csv", "out/ncu.json")
    assert ncu.output_paths("out/ncu.CSV") == ("out/ncu.csv", "out/ncu.json")
    assert ncu.output_paths("out/h100.m16") == ("out/h100.m16.csv", "out/h100.m16.json")


# -------------------------------------------------------------------------------- on the GPU
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.ncu
def test_ncu_tool_on_the_gpu(tmp_path, capsys):
    try:
        ncu.find_ncu()
    except ncu.NcuError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "ncu"
    rc = main(["ncu", "--m", "16", "--shapes", "1024x1024", "--repeats", "2", "--warmup", "1",
               "--timeout", "400", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((tmp_path / "ncu.json").read_text())
    entry = report["results"][0]
    assert (entry["M"], entry["N"], entry["K"]) == (16, 1024, 1024)
    for kernel in ("awq", "quick"):
        info = entry["kernels"][kernel]
        assert info["calls"] == 2
        assert any(kernel in name for name in info["launch_names"])
        assert info["metrics"]["gpu__time_duration.sum"] > 0
        # Every counter was reported (none NaN) and wavefronts cover the instructions.
        assert all(v is not None for v in info["metrics"].values())
    awq = entry["kernels"]["awq"]["metrics"]
    assert awq["smsp__sass_inst_executed_op_shared_st.sum"] > 0      # the write-back
    assert awq["l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum"] >= \
        awq["smsp__sass_inst_executed_op_shared_st.sum"]
    assert (tmp_path / "ncu.csv").exists()
    assert report["attribution"] == "nvtx"
    assert all(l["range"] and l["range"].startswith(("awq M=16", "quick M=16")) for l in report["launches"])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.ncu
def test_ncu_lineinfo_on_the_gpu(tmp_path, capsys):
    """--lineinfo --export on the GPU: the report is kept and awq's per-line table puts its store
    conflicts on the activation store's line, the one the bank model blames (AWQ_A_ST)."""
    try:
        ncu.find_ncu()
    except ncu.NcuError as exc:
        pytest.skip(str(exc))
    rc = main(["ncu", "--m", "16", "--shapes", "1024x1024", "--repeats", "1", "--lineinfo",
               "--timeout", "400", "--export", str(tmp_path / "r"), "--out", str(tmp_path / "ncu")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (tmp_path / "r.ncu-rep").stat().st_size > 0
    report = json.loads((tmp_path / "ncu.json").read_text())
    for kernel in ("awq", "quick"):
        assert report["lines"][kernel]["error"] is None and (tmp_path / f"ncu_lines_{kernel}.txt").exists()
    awq_rows = [r for r in report["lines"]["awq"]["rows"] if r["file"].endswith("awq_gemm.cu")]
    store = next(r for r in awq_rows if r["excessive"] > 0)
    assert "A_s[" in store["source"]
    measured = report["results"][0]["kernels"]["awq"]["metrics"]
    assert store["excessive"] == measured["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"]


# ------------------------------------------------------------------- per-line tables, --export
DATA = Path(__file__).parent / "data"
# Recorded on the H100 (ncu 2025.3.1, run of python -m quickcupy ncu --lineinfo, M=16 K=N=4096):
# an excerpt of the cuda,sass source page of quick_gemm (paths shortened), and of the details
# page of an NVTX-filtered run (awq_gemm, its splitk_reduce and a quick_gemm launch, all rows).
SOURCE_PAGE = DATA / "ncu_source_quick_m16.csv"
DETAILS_NVTX = DATA / "ncu_details_nvtx.csv"


def test_parse_details_with_nvtx_ranges_and_rule_rows():
    launches = ncu.parse_ncu_csv(DETAILS_NVTX.read_text())
    assert [l.id for l in launches] == [0, 1, 4]
    assert [l.nvtx for l in launches] == [
        ("quickcupy_ncu", "awq M=16 N=4096 K=4096 g=128 #0"),
        ("quickcupy_ncu", "awq M=16 N=4096 K=4096 g=128 #0"),
        ("quickcupy_ncu", "quick M=16 N=4096 K=4096 g=128 #0")]
    assert launches[1].name == REDUCE
    # Every requested metric is read, numbers not rule text; rule rows add no metric.
    for launch in launches:
        assert set(ncu.METRIC_NAMES) <= set(launch.metrics)
        assert all(isinstance(v, float) for v in launch.metrics.values())
    calls = [{"kernel": k, "layout": k, "M": 16, "N": 4096, "K": 4096, "group_size": 128, "repeat": 0,
              "warmup": False} for k in ("awq", "quick")]
    grouped = ncu.group_by_range(launches, calls)
    assert [[l.id for l in g] for _, g in grouped] == [[0, 1], [4]]


def test_parse_source_page_recorded_on_the_gpu(tmp_path):
    rows = ncu.parse_source_csv(SOURCE_PAGE.read_text())
    lines = ncu.per_line(rows)
    assert [(os.path.basename(r.file), r.line) for r in lines] == [
        ("quant_common.cuh", 93), ("quant_common.cuh", 116), ("quick_gemm.cu", 60), ("quick_gemm.cu", 63)]
    sass = [r for r in rows if r.address]
    assert sass and all(r.address.startswith("0x") for r in sass)
    assert {r.source.split()[0] for r in sass} == {"LDGSTS.E.BYPASS.128", "LDSM.16.M88.4"}
    # ncu's line rows are the sums of their instructions; the excerpt keeps every shared-memory one
    # of these lines, so the parsed columns must agree (a misread column would not).
    for line in lines:
        under = [r for r in sass if (r.file, r.line) == (line.file, line.line)]
        for key in ("wavefronts", "ideal", "excessive"):
            assert line.values[key] == sum(r.values[key] for r in under)
    for r in sass:
        assert r.values["wavefronts"] == r.values["ideal"] + r.values["excessive"]
    # The row whose CUDA text has unescaped quotes (':: "r"(...)') parses into the right columns.
    asm = next(r for r in lines if r.line == 116)
    assert asm.values["excessive"] > 0 and asm.values["inst"] > 0
    totals = ncu.kernel_totals(rows)
    assert totals["wavefronts"] == sum(r.values["wavefronts"] for r in {r.address: r for r in sass}.values())
    table = ncu.format_lines(lines, totals)
    assert "quick_gemm.cu:63" in table and "quick_gemm.cu:60" not in table      # no shared traffic
    assert table.splitlines()[-1].startswith("kernel")
    with pytest.raises(ValueError, match="no ncu source-page header"):
        ncu.parse_source_csv("==PROF== nothing\n")


def test_fill_source_takes_the_text_from_the_file(tmp_path):
    (tmp_path / "k.cu").write_text("a\n  smem[i] = v;  // why\n")
    rows = [ncu.SourceRow(str(tmp_path / "k.cu"), 2, "", ':: "broken', {}),
            ncu.SourceRow("/elsewhere/other.cu", 1, "", "kept", {}),
            ncu.SourceRow(str(tmp_path / "k.cu"), 2, "0x10", "LDS R0, [R1]", {})]
    ncu.fill_source(rows, tmp_path)
    assert [r.source for r in rows] == ["  smem[i] = v;  // why", "kept", "LDS R0, [R1]"]


def test_cli_lineinfo_and_export_with_fake_ncu(fake_ncu, tmp_path, capsys):
    exe, data = fake_ncu
    _write_fake_run(data)
    for function in ("awq_gemm", "quick_gemm"):
        shutil.copy(SOURCE_PAGE, data / f"source_{function}.csv")
    out, rep = tmp_path / "res" / "m16", tmp_path / "rep" / "m16"
    assert main(["ncu", "--ncu", str(exe), "--m", "16", "--repeats", "2", "--lineinfo",
                 "--export", str(rep), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    argv = (data / "argv.txt").read_text().splitlines()
    assert argv[argv.index("--export") + 1] == str(rep) + ".ncu-rep"
    assert argv[argv.index("--section") + 1] == "SourceCounters"
    assert f"saved {rep}.ncu-rep" in text and (tmp_path / "rep" / "m16.ncu-rep").exists()
    table = (tmp_path / "res" / "m16_lines_quick.txt").read_text()
    source_line = (kernels.cuda_dir() / "quick_gemm.cu").read_text().splitlines()[62].strip()
    assert "quick_gemm.cu:63" in table and source_line[:60] in table
    assert "NVTX range 'quick M=16 N=8192 K=8192 g=128 #0'" in table
    assert "# command: python -m quickcupy ncu --ncu" in table
    assert (tmp_path / "res" / "m16_lines_awq.txt").exists()
    saved = json.loads((tmp_path / "res" / "m16.json").read_text())
    rows = saved["lines"]["quick"]["rows"]
    assert [r["line"] for r in rows if r["file"].endswith("quick_gemm.cu")] == [60, 63]
    assert saved["lines"]["quick"]["totals"]["excessive"] > 0 and saved["lines"]["quick"]["error"] is None


def test_cli_lineinfo_unreadable_page_is_reported_not_fatal(fake_ncu, tmp_path, capsys):
    exe, data = fake_ncu
    _write_fake_run(data)
    for function in ("awq_gemm", "quick_gemm"):
        (data / f"source_{function}.csv").write_text("==ERROR== no source\n")
    assert main(["ncu", "--ncu", str(exe), "--m", "16", "--repeats", "2", "--lineinfo", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "no per-line table for quick" in report["lines"]["quick"]["error"]
    assert report["results"][0]["kernels"]["quick"]["calls"] == 2


def test_export_path_is_checked_before_the_run(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["ncu", "--export", str(blocked / "sub" / "r")]) == 2
    assert "--export" in capsys.readouterr().err
    folder = tmp_path / "x.ncu-rep"
    folder.mkdir()
    assert main(["ncu", "--export", str(tmp_path / "x")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_group_by_range_joins_by_name_not_order():
    calls = sample_calls()[1::2]                       # the measured awq and quick calls
    awq, quick = ((ncu.ROOT_RANGE, ncu.call_range(c)) for c in calls)

    def launches(ranges, names=(QUICK, AWQ, REDUCE)):
        return ncu.parse_ncu_csv(csv_for([(n, {}) for n in names], ranges=ranges))
    grouped = ncu.group_by_range(launches([quick, awq, awq]), calls)
    assert [(c["kernel"], [l.name for l in g]) for c, g in grouped] == [("awq", [AWQ, REDUCE]), ("quick", [QUICK])]
    with pytest.raises(ncu.NcuError, match=r"launch 0 .* is in no quickcupy NVTX range \(ranges: \['quickcupy_ncu'\]\)"):
        ncu.group_by_range(launches([(ncu.ROOT_RANGE,), awq, awq]), calls)
    with pytest.raises(ncu.NcuError, match="which the child did not make"):
        ncu.group_by_range(launches([(ncu.ROOT_RANGE, "awq M=1 N=1 K=1 g=128 #7"), awq, awq]), calls)
    with pytest.raises(ncu.NcuError, match="no launch in NVTX range 'quick M=16"):
        ncu.group_by_range(launches([awq, awq], (AWQ, REDUCE)), calls)
    with pytest.raises(ncu.NcuError, match="'awq M=16 .* starts with 'quick_gemm<16, 4, 4, 3>', not a awq kernel"):
        ncu.group_by_range(launches([awq, quick, quick]), calls)


def test_no_nvtx_attributes_by_launch_order(fake_ncu, tmp_path, capsys):
    exe, data = fake_ncu
    _write_fake_run(data, nvtx=False)
    assert main(["ncu", "--ncu", str(exe), "--m", "16", "--repeats", "2", "--no-nvtx", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attribution"] == "launch order" and len(report["launches"]) == 9
    argv = (data / "argv.txt").read_text().splitlines()
    assert "--nvtx" not in argv and "--no-nvtx" in argv


def _line_table_files(cubin: bytes, folder: bytes) -> list:
    """File names of the DWARF 2-4 line table whose include folders list ``folder``: after the
    folders' closing NUL, entries of name NUL + three ULEB128s (folder index, mtime, length) until an
    empty name. NVRTC 13 writes 0 for mtime and length, NVRTC 12 the source's real ones."""
    at = cubin.index(b"\0\0", cubin.index(folder + b"\0")) + 2
    names = []
    while cubin[at]:
        end = cubin.index(b"\0", at)
        names.append(cubin[at:end].decode())
        at = end + 1
        for _ in range(3):
            while cubin[at] & 0x80:       # a ULEB128 byte with the high bit set continues the number
                at += 1
            at += 1
    return names


def test_line_table_files_reads_both_nvrtc_layouts():
    """The two layouts seen: NVRTC 13 (zero mtime and length) and 12 (one-byte to five-byte ULEBs)."""
    v13 = b"\x01\x01/src/cuda\0\0awq_gemm.cu\0\x01\0\0quant_common.cuh\0\x01\0\0\0\x09"
    v12 = (b"\x01\x01/src/cuda\0\0awq_gemm.cu\0\x01\xee\x9b\xd9\xd8\x06\xa5\"quant_common.cuh\0\x01"
           b"\xee\x9b\xd9\xd8\x06\xc5\xb1\x01\0\0")
    for cubin in (v13, v12):
        assert _line_table_files(cubin, b"/src/cuda") == ["awq_gemm.cu", "quant_common.cuh"]


@needs_nvrtc
def test_lineinfo_build_names_the_cuda_file(monkeypatch):
    """QUICKCUPY_LINEINFO=1: -lineinfo in the options and line tables naming cuda/awq_gemm.cu."""
    name = registry.DESIGNS["awq"].instances()[0]
    plain, _, _ = kernels.nvrtc_compile("awq_gemm.cu", "sm_90", [name])
    monkeypatch.setenv(kernels.LINEINFO_ENV, "1")
    assert kernels.compile_options("sm_90")[-1] == "-lineinfo"
    assert kernels.source_code("awq_gemm.cu").splitlines()[1] == \
        f'#line 1 "{(kernels.cuda_dir() / "awq_gemm.cu").resolve()}"'
    cubin, _, _ = kernels.nvrtc_compile("awq_gemm.cu", "sm_90", [name])
    # The line table stores the folder and the file names (the header's lines too).
    folder = str(kernels.cuda_dir().resolve()).encode()
    for text in (b".debug_line", folder):
        assert text in cubin and text not in plain
    assert {"awq_gemm.cu", "quant_common.cuh"} <= set(_line_table_files(cubin, folder))


# ------------------------------------------------------------------------------- LDGSTS probe
def test_ldgsts_probes_are_conflict_free_for_the_bank_model():
    """Every probe's shared addresses take the ideal 4 wavefronts per warp instruction in the bank
    model, so whatever ncu counts above that is not a bank conflict of the lane addresses."""
    for name, case in ldgsts_probe.CASES.items():
        soff = case[0]
        assert soff.shape[1] % 32 == 0 and soff.max() + 16 <= 8192, name
        assert ldgsts_probe.predicted(case) == 4 * soff.shape[0] * soff.shape[1] // 32, name


def test_ldgsts_probe_results_match_the_cases():
    """The committed H100 probe results cover exactly the probe's cases and print as the table."""
    result = json.loads((Path(__file__).parents[1] / "results/h100/ldgsts_probe.json").read_text())
    assert [c["name"] for c in result["cases"]] == list(ldgsts_probe.CASES)
    assert all(c["predicted"] == ldgsts_probe.predicted(ldgsts_probe.CASES[c["name"]]) for c in result["cases"])
    table = ldgsts_probe.format_table(result).splitlines()
    assert len(table) == 3 + len(ldgsts_probe.CASES)
