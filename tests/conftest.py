"""Shared fixtures: the real Hippocampus data (../shared/data/hippocampus, or $SEMISAM_DATA)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISAM_DATA", REPO.parent / "shared" / "data" / "hippocampus"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "dataset.json").is_file():
        pytest.skip(f"real data not found at {DATA} (set SEMISAM_DATA)")
    return DATA


@pytest.fixture(scope="session")
def split(data_root) -> dict:
    return json.loads((data_root / "splits.json").read_text())
