"""benchmarks.bench_scale's meter: a stage's seconds and peak memory are the stage's own."""

from __future__ import annotations

import sys

from benchmarks import bench_scale

SCRIPT = """
import time, numpy as np
print('[run] small: start', flush=True)
time.sleep(1.0)
print('[run] big: start', flush=True)
a = np.ones(300 * 2**20 // 8)  # 300 MiB touched
time.sleep(1.5)
del a
print('[run] tail: start', flush=True)
time.sleep(0.5)
"""


def test_meter_attributes_memory_and_time_to_the_announced_stage(tmp_path):
    out = bench_scale.run_size([sys.executable, "-c", SCRIPT], tmp_path / "log.txt", interval=0.05)
    peak, sec = out["stage_peak_mib"], out["stage_seconds"]
    assert peak["big"] > peak["small"] + 250 and peak["big"] > peak["tail"] + 250
    assert 1.3 <= sec["big"] <= 3.0 and 0.8 <= sec["small"] <= 2.0
    assert "[run] big: start" in (tmp_path / "log.txt").read_text()


def test_split_of_size_keeps_the_template_and_refuses_too_many():
    split = {"template": "t", "unlabeled": ["a", "b", "c"], "test": ["x"]}
    assert bench_scale.split_of_size(split, 3) == {"template": "t", "unlabeled": ["a", "b"], "test": []}
    try:
        bench_scale.split_of_size(split, 5)
    except SystemExit as e:
        assert "only 4 cases" in str(e)
    else:
        raise AssertionError("a size beyond the split was accepted")
