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
    # each stage at least its own sleep; the upper bounds leave room for a loaded machine (3.9 s measured
    # for "big" at load 5 on 2 cores), while a stage given another's time would be short of its sleep
    assert 1.3 <= sec["big"] <= 15.0 and 0.8 <= sec["small"] <= 10.0 and 0.3 <= sec["tail"] <= 10.0
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


def test_per_volume_divides_encode_by_the_cases_it_encoded():
    row = {"volumes": 50, "encoded": 25, "stage_seconds": {"encode": 500.0, "propagate": 100.0}}
    assert bench_scale.per_volume(row) == {"encode": 20.0, "propagate": 2.0}
    rows = [{"volumes": 25, "stage_seconds_per_volume": {"encode": 20.0, "propagate": 2.0},
             "stage_peak_mib": {"encode": 1000.0, "propagate": 500.0}},
            {"volumes": 50, "stage_seconds_per_volume": {"encode": 22.0, "propagate": 4.0},
             "stage_peak_mib": {"encode": 1100.0, "propagate": 1500.0}}]
    s = bench_scale.summarise(rows)
    assert s["stage_seconds_per_volume_ratio"] == {"encode": 1.1, "propagate": 2.0}
    assert s["seconds_per_volume_ratio"] == round(26.0 / 22.0, 3)
    assert s["peak_mib_ratio"] == 1.5 and s["stage_peak_mib_ratio"] == {"encode": 1.1, "propagate": 3.0}


def test_seed_store_copies_cases_but_not_the_stage_record(tmp_path):
    prev = tmp_path / "n25"
    for case in ("t", "a", "b"):
        (prev / "features" / "cases" / case).mkdir(parents=True)
        (prev / "features" / "cases" / case / "axis0.npy").write_bytes(b"x")
    (prev / "features" / "store.json").write_text("{}")
    (prev / "features" / "stage.json").write_text("{}")
    work = tmp_path / "n50"
    work.mkdir()
    assert bench_scale.seed_store(prev, work) == 3
    assert (work / "features" / "store.json").is_file() and not (work / "features" / "stage.json").exists()
    assert (work / "features" / "cases" / "b" / "axis0.npy").read_bytes() == b"x"
    assert bench_scale.seed_store(None, tmp_path / "n100") == 0
