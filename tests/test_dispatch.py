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
