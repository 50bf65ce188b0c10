"""bench/learn_probe.py --demo-size's table: the best val AP50 reached by each training-time mark."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "learn_probe.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_learn_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_marks_double_from_ten_minutes_and_end_at_the_budget():
    probe = _module()
    assert probe._marks(4200) == [600, 1200, 2400, 4200]
    assert probe._marks(2400) == [600, 1200, 2400]  # no 40-min mark a minute before the budget
    assert probe._marks(200) == [200]


def test_demo_table_reports_the_best_ap50_by_each_mark():
    """The last evaluation ends past the budget (an epoch is not cut short): it still counts for the last mark."""
    curve = [{"epoch": 1, "train_s": 500, "loss": 9.0, "ap": 0.0, "ap50": 0.01},
             {"epoch": 2, "train_s": 2000, "loss": 7.0, "ap": 0.01, "ap50": 0.05},
             {"epoch": 3, "train_s": 4300, "loss": 6.0, "ap": 0.30, "ap50": 0.70}]
    rows = [{"variant": "v", "seed": 0, "train_images": 1024, "epochs": 3, "train_s": 4300.0, "curve": curve}]
    table = _module()._demo_table(rows, 4200).splitlines()
    assert "best val AP50 by 10 / 20 / 40 / 70 min of training" in table[0]
    assert table[2] == "| v | 0 | 1024 | 3 | 9.00 | 6.00 | 0.010 / 0.010 / 0.050 / 0.700 | 0.700 (3) | 0.300 | 1433.3 |"
