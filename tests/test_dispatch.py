"""quickcupy.dispatch and the tune tool's rule making (CPU)."""
import json

import pytest

from quickcupy import dispatch
from quickcupy.tools.tune import CANDIDATES, rules_from


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
    for path in dispatch.TUNING_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert dispatch.device_slug(data["device"]) == path.stem
        assert dispatch.table_for(data["device"])["source"] == str(path)
    assert dispatch.table_for("Some Future GPU")["rules"] == dispatch.DEFAULT_RULES
    assert dispatch.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


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
    table = dispatch.table_for("NVIDIA H100 80GB HBM3")
    assert {(k, n) for k, n, _ in table["shapes"]} >= {(8192, 8192), (4096, 4096)}


def test_a_dtype_section_overrides_float16_rules_for_that_dtype(monkeypatch):
    from quickcupy import kernels
    fp16 = dispatch.check_rules([{"max_m": 1024, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}])
    bf16 = dispatch.check_rules([{"max_m": 256, "kernel": "quick"}, {"max_m": None, "kernel": "dequant"}])
    table = {"rules": fp16, "shapes": (), "dtypes": {"bfloat16": {"rules": bf16, "shapes": ()}}}
    monkeypatch.setattr(dispatch, "_device_name", lambda device_id: "test")
    monkeypatch.setattr(dispatch, "table_for", lambda name: table)
    monkeypatch.setattr(kernels, "unsupported_reason", lambda kernel, device_id: None)
    choose = dispatch.kernel_for.__wrapped__
    assert choose(512, 4096, 4096, 0, "float16").name == "quick"
    assert choose(512, 4096, 4096, 0, "bfloat16").name == "dequant"
    assert dispatch.section_for(table, "float16") is table


def test_the_h100_table_has_bf16_rules():
    table = dispatch.table_for("NVIDIA H100 80GB HBM3")
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
