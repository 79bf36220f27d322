"""quickcupy.dispatch and the tune tool's rule making (CPU)."""
import hashlib
import json
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from quickcupy import dispatch
from quickcupy.tools.tune import CANDIDATES, rules_from

H100 = "NVIDIA H100 80GB HBM3"
ROOT = Path(__file__).resolve().parent.parent
RULES = [{"max_m": 64, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}]


@pytest.fixture(autouse=True)
def user_dir(tmp_path, monkeypatch):
    """An empty user tuning folder of the test's own, no forced table, fresh caches before and after."""
    folder = tmp_path / "user-tuning"
    folder.mkdir()
    monkeypatch.setenv(dispatch.TUNING_DIR_ENV, str(folder))
    monkeypatch.delenv(dispatch.FORCE_ENV, raising=False)
    dispatch.clear_caches()
    yield folder
    dispatch.clear_caches()


def test_choose_walks_the_rules():
    rules = dispatch.check_rules([{"max_m": 16, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}])
    assert [dispatch.choose(m, rules) for m in (1, 16, 17, 9000)] == ["quick", "quick", "dequant", "dequant"]


@pytest.mark.parametrize("rules,match", [
    ([], "non-empty"),
    ([{"max_m": 16, "kernel": "quick"}], "only the last rule is unbounded"),
    ([{"max_m": None, "kernel": "awq"}], "not a quick-layout kernel"),
    ([{"max_m": None, "kernel": "auto"}], "not a quick-layout kernel"),
    ([{"max_m": 64, "kernel": "quick"}, {"max_m": 32, "kernel": "dequant"}, {"max_m": None, "kernel": "quick"}],
     "must increase"),
])
def test_bad_rules_are_refused(rules, match):
    with pytest.raises(ValueError, match=match):
        dispatch.check_rules(rules)


def test_tables_in_the_package_are_valid_and_default_exists():
    paths = sorted(dispatch.TUNING_DIR.glob("*.json"))
    assert {p.name for p in paths} >= {"nvidia-h100-80gb-hbm3.json", "arch-sm90.json", "arch-sm80.json"}
    for path in paths:
        data = json.loads(path.read_text())
        table = dispatch.load_table(path)
        commands = [data.get("command", "")] + [d.get("command", "") for d in data.get("dtypes", {}).values()]
        assert not any("/root" in c or " /" in c for c in commands), "a command names a machine's path"
        if table["arch"] is None:
            assert dispatch.device_slug(data["device"]) == path.stem
            found = dispatch.table_for(data["device"], "sm_90")
            assert (found["source"], found["path"]) == ("package", str(path))
        else:
            assert path.stem == "arch-" + table["arch"].replace("_", "")
            assert all(dispatch.table_for("Some GPU", t)["path"] == str(path) for t in table["targets"])
    generic = dispatch.table_for("Some Future GPU", "sm_120")
    assert generic["rules"] == dispatch.DEFAULT_RULES and generic["source"] == "generic"
    assert dispatch.table_for("Some Future GPU")["source"] == "generic"       # compute capability unknown
    assert dispatch.device_slug(H100) == "nvidia-h100-80gb-hbm3"


def test_rules_from_measurements_pick_the_geometric_mean_winner():
    pts = []
    for (K, N) in ((4096, 4096), (8192, 8192)):
        for M, times in ((1, {"quick": 10, "dequant": 50}), (128, {"quick": 70, "dequant": 80}),
                         (256, {"quick": 120, "dequant": 100}), (1024, {"quick": 400, "dequant": 220})):
            pts += [{"K": K, "N": N, "M": M, "kernel": k, "time_us": t * (K / 4096)} for k, t in times.items()]
    rules, rows = rules_from(pts, ("quick", "dequant"))
    assert list(rules) == [{"max_m": 128, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}]
    assert rows[0]["choice"] == "quick" and rows[0]["dequant worst/best"] == 5.0
    assert "auto" not in CANDIDATES and "quick" in CANDIDATES and "dequant" in CANDIDATES


def test_rules_of_the_nearest_measured_weight_size():
    small = dispatch.check_rules([{"max_m": 256, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}])
    large = dispatch.check_rules([{"max_m": 1024, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}])
    table = {"rules": large, "shapes": ((4096, 4096, small), (8192, 8192, large))}
    assert dispatch.rules_for(table, 4096, 4096) is small
    assert dispatch.rules_for(table, 5120, 4096) is small            # nearer 4096^2 in log(N * K)
    assert dispatch.rules_for(table, 28672, 8192) is large
    assert dispatch.rules_for({"rules": large}, 4096, 4096) is large  # a table without shapes
    assert dispatch.choose(512, dispatch.rules_for(table, 4096, 4096)) == "dequant"


def test_the_h100_table_has_rules_per_measured_shape():
    table = dispatch.table_for(H100, "sm_90")
    assert {(k, n) for k, n, _ in table["shapes"]} >= {(8192, 8192), (4096, 4096)}


def test_a_dtype_section_overrides_float16_rules_for_that_dtype(monkeypatch):
    from quickcupy import kernels
    fp16 = dispatch.check_rules([{"max_m": 1024, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}])
    bf16 = dispatch.check_rules([{"max_m": 256, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}])
    table = {"rules": fp16, "shapes": (), "dtypes": {"bfloat16": {"rules": bf16, "shapes": ()}}}
    monkeypatch.setattr(dispatch, "_device_name", lambda device_id: "test")
    monkeypatch.setattr(kernels, "device_arch", lambda device_id: "sm_90")
    monkeypatch.setattr(dispatch, "table_for", lambda name, arch=None: table)
    monkeypatch.setattr(kernels, "unsupported_reason", lambda kernel, device_id: None)
    choose = dispatch.kernel_for.__wrapped__
    assert choose(512, 4096, 4096, 0, "float16").name == "quick"
    assert choose(512, 4096, 4096, 0, "bfloat16").name == "dequant"
    assert dispatch.section_for(table, "float16") is table


def test_the_h100_table_has_bf16_rules():
    table = dispatch.table_for(H100, "sm_90")
    assert set(table["dtypes"]) == {"bfloat16"}
    assert table["dtypes"]["bfloat16"]["shapes"]


def _bench_json(path, dtype, device="Test GPU"):
    pts = []
    for (K, N) in ((4096, 4096), (8192, 8192)):
        for M, times in ((1, {"quick": 10, "dequant": 50, "fp16": 30}), (1024, {"quick": 400, "dequant": 220})):
            pts += [{"K": K, "N": N, "M": M, "kernel": k, "time_us": t} for k, t in times.items()]
    path.write_text(json.dumps({"settings": {"dtype": dtype, "group_size": 128}, "device": {"name": device},
                                "points": pts}))
    return str(path)


def test_tune_from_points_writes_one_dtype_and_keeps_the_others(tmp_path):
    from quickcupy.__main__ import main
    out = tmp_path / "table.json"
    assert main(["tune", "--points", _bench_json(tmp_path / "f.json", "float16"), "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["rules"] == [{"max_m": 1, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}]
    assert main(["tune", "--dtype", "bfloat16", "--points", _bench_json(tmp_path / "b.json", "bfloat16"),
                 "--out", str(out)]) == 0
    both = json.loads(out.read_text())
    assert both["rules"] == first["rules"] and both["shapes"] == first["shapes"]
    assert both["dtypes"]["bfloat16"]["rules"] == first["rules"]
    assert [(e["K"], e["N"]) for e in both["dtypes"]["bfloat16"]["shapes"]] == [(4096, 4096), (8192, 8192)]


def test_tune_refuses_points_of_another_dtype_or_device(tmp_path, capsys):
    from quickcupy.__main__ import main
    out = tmp_path / "table.json"
    assert main(["tune", "--dtype", "bfloat16", "--points", _bench_json(tmp_path / "f.json", "float16"),
                 "--out", str(out)]) == 2
    assert "measured with float16 activations, not --dtype bfloat16" in capsys.readouterr().err
    assert not out.exists()
    assert main(["tune", "--points", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "not a readable bench JSON" in capsys.readouterr().err
    assert main(["tune", "--points", _bench_json(tmp_path / "f.json", "float16"), "--out", str(out)]) == 0
    assert main(["tune", "--points", _bench_json(tmp_path / "g.json", "float16", "Other GPU"),
                 "--out", str(out)]) == 2
    assert "holds the table of 'Test GPU'" in capsys.readouterr().err


# ------------------------------------------------------------------ table files: schema, order, sources
def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _table(device=H100, rules=RULES, **more):
    return {"schema": dispatch.SCHEMA, "device": device, "rules": rules, **more}


def _fake_gpu(monkeypatch, name, arch):
    """kernel_for on CUDA device 0 as GPU model ``name`` of compute capability ``arch``, every kernel runnable."""
    from quickcupy import kernels
    monkeypatch.setattr(dispatch, "_device_name", lambda device_id: name)
    monkeypatch.setattr(kernels, "device_arch", lambda device_id: arch)
    monkeypatch.setattr(kernels, "unsupported_reason", lambda kernel, device_id: None)
    dispatch.clear_caches()


def _package_hashes():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dispatch.TUNING_DIR.iterdir())}


@pytest.mark.parametrize("rules,match", [
    ([["quick", None]], "exactly max_m and kernel"),
    ([{"max_m": None, "kernel": "quick", "extra": 1}], "exactly max_m and kernel"),
    ([{"max_m": True, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}], "True must increase"),
    ([{"max_m": 0, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}], "0 must increase"),
    ([{"max_m": 32, "kernel": "quick_decode"}, {"max_m": None, "kernel": "dequant"}], "serves M <= 16"),
])
def test_rules_are_checked_fully(rules, match):
    with pytest.raises(ValueError, match=match):
        dispatch.check_rules(rules)


@pytest.mark.parametrize("data,match", [
    ([], "must be a JSON object"),
    ({"device": H100, "rules": RULES}, "schema=None, this quickcupy reads schema 1"),
    (_table(schema=2), "schema=2"),
    (_table(schema=True), "schema=True"),
    (_table(arch="sm_90", targets=["sm_90"]), "either its GPU"),
    ({"schema": 1, "rules": RULES}, "either its GPU"),
    ({"schema": 1, "arch": "sm_90", "rules": RULES}, "targets=\\[\\] must list"),
    ({"schema": 1, "arch": "sm_90", "targets": ["90"], "rules": RULES}, "must list"),
    (_table(targets=["sm_90"]), "targets belong to architecture defaults"),
    (_table(rule=RULES), "unknown keys \\['rule'\\]"),
    (_table(shapes=[{"K": 4096, "N": 4096}]), "exactly K, N and rules"),
    (_table(shapes=[{"K": "4096", "N": 4096, "rules": RULES}]), "must be positive integers"),
    (_table(shapes=[{"K": 64, "N": 64, "rules": RULES}] * 2), "appears twice"),
    (_table(shapes=[{"K": 64, "N": 64, "rules": RULES[:1]}]), "shape 64x64 rules\\[0\\]"),
    (_table(dtypes={"float16": {"rules": RULES}}), "dtypes \\['float16'\\] are not among \\('bfloat16',\\)"),
    (_table(dtypes={"bfloat16": {"rules": [{"max_m": None, "kernel": "awq"}]}}), "dtype bfloat16 rules\\[0\\]"),
    (_table(dtypes={"bfloat16": []}), "dtype bfloat16 must be an object"),
])
def test_a_malformed_table_is_refused_naming_the_rule(data, match):
    with pytest.raises(ValueError, match=match):
        dispatch.check_table(data, "t.json")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 14) | st.sampled_from(
    ["quick", "dequant", "quick_decode", "awq", "auto", "sm_90", H100, "bfloat16", "float16"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["schema", "device", "arch", "targets", "rules", "shapes", "dtypes", "bfloat16", "max_m", "kernel",
         "K", "N", "x"]), inner, max_size=5), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from([_table(), _table(shapes=[{"K": 64, "N": 64, "rules": RULES}]),
                             _table(dtypes={"bfloat16": {"rules": RULES}})]),
       key=st.sampled_from(["schema", "device", "rules", "shapes", "dtypes", "arch", "targets", "note"]),
       value=_JSON)
def test_any_json_is_validated_or_refused_with_a_value_error(base, key, value):
    """What a GEMM call meets in a table file: check_table returns a table or raises ValueError, never
    another exception (which would escape the fallback)."""
    for data in ({**base, key: value}, value):
        try:
            table = dispatch.check_table(data, "t.json")
        except ValueError:
            continue
        assert dispatch.choose(1, table["rules"]) in CANDIDATES


def test_resolution_order_user_then_shipped_then_architecture_then_generic(monkeypatch, user_dir):
    for name, arch, source, m1, m128 in (
            (H100, "sm_90", "package", "quick_decode", "quick_sm90"),
            ("NVIDIA H200", "sm_90", "arch", "quick_decode", "quick_sm90"),    # a Hopper without a table
            ("NVIDIA L4", "sm_89", "arch", "quick", "quick"),
            ("NVIDIA A100-SXM4-80GB", "sm_80", "arch", "quick", "quick"),
            ("Some Future GPU", "sm_120", "generic", "quick", "quick")):
        _fake_gpu(monkeypatch, name, arch)
        assert dispatch.table_for(name, arch)["source"] == source, name
        assert (dispatch.kernel_for(1, 8192, 8192, 0).name, dispatch.kernel_for(128, 8192, 8192, 0).name) == (m1, m128), name
        assert dispatch.kernel_for(4096, 8192, 8192, 0).name == "dequant"
        _write(user_dir / f"{dispatch.device_slug(name)}.json",
               _table(name, [{"max_m": 2, "kernel": "dequant"}, {"max_m": None, "kernel": "quick"}]))
        dispatch.clear_caches()
        assert dispatch.table_for(name, arch)["source"] == "user"
        assert dispatch.table_for(name, arch)["path"] == str(user_dir / f"{dispatch.device_slug(name)}.json")
        assert (dispatch.kernel_for(1, 8192, 8192, 0).name, dispatch.kernel_for(128, 8192, 8192, 0).name) == ("dequant", "quick")
    assert dispatch.table_for("Another GPU", "sm_86")["arch"] == "sm_80"


def test_the_sm90_defaults_choose_as_the_h100_table_does():
    """On 8192 x 8192, at the M values of the H200 comparison in BENCHMARKS (1, 64, 256) and beyond, for both dtypes."""
    h100 = dispatch.table_for(H100, "sm_90")
    sm90 = dispatch.table_for("NVIDIA H200", "sm_90")
    assert (h100["source"], sm90["source"], sm90["arch"]) == ("package", "arch", "sm_90")
    for dtype in ("float16", "bfloat16"):
        for M in (1, 16, 64, 256, 1024):
            want = dispatch.choose(M, dispatch.rules_for(dispatch.section_for(h100, dtype), 8192, 8192))
            assert dispatch.choose(M, dispatch.rules_for(dispatch.section_for(sm90, dtype), 8192, 8192)) == want
    assert dispatch.choose(1, sm90["rules"]) == "quick_decode"


def test_the_architecture_defaults_are_derived_from_the_committed_h100_points():
    """arch-sm90: the H100's rules over all shapes; arch-sm80: the same points, quick and dequant only."""
    points = {dtype: json.loads((ROOT / "results/h100" / name).read_text())["points"]
              for dtype, name in (("float16", "tune_points.json"), ("bfloat16", "tune_points_bf16.json"))}
    h100 = dispatch.table_for(H100, "sm_90")
    for arch, kernels in (("sm_90", CANDIDATES), ("sm_80", ("quick", "dequant"))):
        table = dispatch.load_table(dispatch.TUNING_DIR / f"arch-{arch.replace('_', '')}.json")
        for dtype, pts in points.items():
            derived = rules_from([p for p in pts if p["kernel"] in kernels], kernels)[0]
            assert dispatch.section_for(table, dtype)["rules"] == derived, (arch, dtype)
            if arch == "sm_90":
                assert derived == dispatch.section_for(h100, dtype)["rules"]
    assert dispatch.table_for("x", "sm_80")["rules"] == dispatch.DEFAULT_RULES


@pytest.mark.parametrize("content,problem", [
    ("{not json", "not JSON"),
    (b"\xff\xfe{}", "cannot be read"),
    (_table(schema=2), "schema=2"),
    ({"device": H100, "rules": RULES}, "schema=None"),
    (_table(rules=[{"max_m": None, "kernel": "quick_fast"}]), "kernel='quick_fast' is not a quick-layout kernel"),
    (_table(rules=[{"max_m": 64, "kernel": "quick"}, {"max_m": 32, "kernel": "quick_sm90"},
                   {"max_m": None, "kernel": "dequant"}]), "max_m=32 must increase"),
    (_table("NVIDIA H200"), "holds the table of 'NVIDIA H200'"),
])
def test_a_bad_user_table_falls_back_with_one_warning(monkeypatch, user_dir, content, problem):
    path = user_dir / "nvidia-h100-80gb-hbm3.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _write(path, content)
    _fake_gpu(monkeypatch, H100, "sm_90")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = {M: dispatch.kernel_for(M, 8192, 8192, 0).name for M in (1, 16, 128, 4096)}
        assert dispatch.kernel_for(1, 8192, 8192, 0, "bfloat16").name == "quick_decode"
    assert kernels == {1: "quick_decode", 16: "quick_decode", 128: "quick_sm90", 4096: "dequant"}  # the shipped table's
    assert len(caught) == 1 and caught[0].category is dispatch.TableWarning
    message = str(caught[0].message)
    assert str(path) in message and problem in message and "using the shipped table" in message
    assert "\n" not in message


def test_a_bad_table_of_a_gpu_without_one_shipped_falls_back_to_the_architecture(monkeypatch, user_dir):
    _write(user_dir / "nvidia-h200.json", "[]")
    _fake_gpu(monkeypatch, "NVIDIA H200", "sm_90")
    with pytest.warns(dispatch.TableWarning, match="must be a JSON object; using the architecture defaults sm_90"):
        assert dispatch.kernel_for(1, 8192, 8192, 0).name == "quick_decode"
    _fake_gpu(monkeypatch, "NVIDIA H200", "sm_75")
    with pytest.warns(dispatch.TableWarning, match="using the generic defaults"):
        assert dispatch.kernel_for(1, 8192, 8192, 0).name == "quick"


def test_auto_table_env_forces_the_architecture_defaults_or_a_file(monkeypatch, tmp_path, user_dir):
    _fake_gpu(monkeypatch, H100, "sm_90")
    assert dispatch.kernel_for(384, 12288, 4096, 0).name == "dequant"          # the H100's rules at 4096 x 12288
    _write(user_dir / "nvidia-h100-80gb-hbm3.json", _table())
    monkeypatch.setenv(dispatch.FORCE_ENV, "arch")                        # over the user's and the shipped table
    dispatch.clear_caches()
    assert dispatch.table_for(H100, "sm_90")["source"] == "arch"
    assert dispatch.kernel_for(384, 12288, 4096, 0).name == "quick_sm90"       # Hopper's rules over all shapes
    assert dispatch.table_for(H100, "sm_120")["source"] == "generic"     # no defaults for this architecture
    forced = _write(tmp_path / "other.json", _table("Some Other GPU", [{"max_m": None, "kernel": "quick"}]))
    monkeypatch.setenv(dispatch.FORCE_ENV, str(forced))                   # a file, whatever GPU it names
    dispatch.clear_caches()
    table = dispatch.table_for(H100, "sm_90")
    assert (table["source"], table["path"]) == ("env", str(forced))
    assert dispatch.kernel_for(4096, 8192, 8192, 0).name == "quick"
    monkeypatch.setenv(dispatch.FORCE_ENV, str(tmp_path / "missing.json"))
    dispatch.clear_caches()
    with pytest.warns(dispatch.TableWarning, match="missing.json: cannot be read .*; using the user table"):
        assert dispatch.table_for(H100, "sm_90")["source"] == "user"


def test_user_tuning_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.TUNING_DIR_ENV, str(tmp_path / "t"))
    assert dispatch.user_tuning_dir() == tmp_path / "t"
    monkeypatch.delenv(dispatch.TUNING_DIR_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert dispatch.user_tuning_dir() == tmp_path / "xdg" / "quickcupy" / "tuning"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dispatch.user_tuning_dir() == tmp_path / "home" / ".config" / "quickcupy" / "tuning"


# ------------------------------------------------------------------ tune: where the table goes
def test_tune_points_writes_the_user_folder_and_leaves_the_package_untouched(tmp_path, user_dir):
    """tune --points of the H100's name once replaced the shipped H100 table; now the user's copy."""
    from quickcupy.__main__ import main
    before = _package_hashes()
    assert main(["tune", "--points", _bench_json(tmp_path / "f.json", "float16", H100)]) == 0
    assert _package_hashes() == before
    written = user_dir / "nvidia-h100-80gb-hbm3.json"
    data = json.loads(written.read_text())
    assert data["schema"] == dispatch.SCHEMA and data["device"] == H100
    assert data["rules"] == [{"max_m": 1, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}]
    shipped = dispatch.load_table(dispatch.TUNING_DIR / "nvidia-h100-80gb-hbm3.json")
    # the part it did not measure: the shipped table's, so bf16 calls keep their measured rules
    assert data["dtypes"]["bfloat16"]["rules"] == list(shipped["dtypes"]["bfloat16"]["rules"])
    assert data["dtypes"]["bfloat16"]["command"].startswith("none measured: copied from the shipped table")
    table = dispatch.table_for(H100, "sm_90")
    assert (table["source"], table["path"]) == ("user", str(written))


def test_tune_of_a_new_gpu_starts_from_its_architecture_defaults(tmp_path, user_dir):
    from quickcupy.__main__ import main
    points = tmp_path / "b.json"
    _bench_json(points, "bfloat16", "NVIDIA H200")
    result = json.loads(points.read_text())
    result["device"]["compute_capability"] = "9.0"
    points.write_text(json.dumps(result))
    assert main(["tune", "--dtype", "bfloat16", "--points", str(points)]) == 0
    data = json.loads((user_dir / "nvidia-h200.json").read_text())
    assert data["rules"] == list(dispatch.load_table(dispatch.TUNING_DIR / "arch-sm90.json")["rules"])
    assert "architecture defaults sm_90" in data["command"]
    assert data["dtypes"]["bfloat16"]["rules"][0] == {"max_m": 1, "kernel": "quick"}


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_tune_refuses_to_write_inside_the_package(tmp_path, capsys, flag):
    from quickcupy.__main__ import main
    before = _package_hashes()
    inside = dispatch.TUNING_DIR / "nvidia-h100-80gb-hbm3.json"
    args = ["tune", "--points", _bench_json(tmp_path / "f.json", "float16", H100), flag, str(inside)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{flag} {inside} is inside the installed package" in err and "read-only data" in err
    assert _package_hashes() == before


def test_tune_refuses_to_extend_a_bad_table(tmp_path, capsys):
    from quickcupy.__main__ import main
    out = _write(tmp_path / "old.json", {"device": "Test GPU", "rules": RULES})      # no schema
    assert main(["tune", "--points", _bench_json(tmp_path / "f.json", "float16"), "--out", str(out)]) == 2
    assert "is not a table this quickcupy can extend" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"device": "Test GPU", "rules": RULES}


# ------------------------------------------------------------------ info: which table auto uses
def test_info_says_which_table_auto_uses(monkeypatch, capsys, user_dir):
    from quickcupy.__main__ import main
    from quickcupy.tools import info
    monkeypatch.setattr(info, "device_info", lambda: {"available": False, "reason": "no driver"})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto table: none (no GPU)" in out and str(user_dir) in out
    monkeypatch.setattr(info, "device_info", lambda: {"available": True, "name": "NVIDIA H200",
                                                      "compute_capability": "9.0"})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto table: architecture defaults sm_90" in out
    assert "float16: quick_decode to M=16, quick_sm90 to 2048, dequant beyond" in out
    assert "bfloat16: quick_decode to M=16, quick_sm90 to 1024, dequant beyond" in out
    monkeypatch.setattr(info, "device_info", lambda: {"available": True, "name": H100, "compute_capability": "9.0"})
    assert main(["info", "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["auto"]
    assert auto["source"] == "package" and auto["path"].endswith("nvidia-h100-80gb-hbm3.json")
    assert len(auto["dtypes"]["bfloat16"]["shapes"]) == 7
    assert info.rules_text(dispatch.DEFAULT_RULES) == "quick to M=128, dequant beyond"
