"""Shared fixtures.

``cohort``: the data the pipeline tests run on: the real MSD Hippocampus data
(``../shared/data/hippocampus``, or ``$SEMISAM_DATA``) when it is there, else a small
synthetic MSD-layout cohort built by :func:`helpers.make_cohort` (so these tests never skip
for lack of data). ``cohort.real`` says which; tests that assert data-specific values pick
them from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import helpers
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISAM_DATA", REPO.parent / "shared" / "data" / "hippocampus"))


def real_data_available() -> bool:
    return (DATA / "dataset.json").is_file() and (DATA / "splits.json").is_file()


@dataclasses.dataclass
class Cohort:
    """A dataset folder and a small split of it."""

    root: Path
    split: dict
    split_file: Path
    real: bool

    @property
    def template(self) -> str:
        return self.split["template"]

    @property
    def unlabeled(self) -> list[str]:
        return list(self.split["unlabeled"])

    @property
    def test(self) -> list[str]:
        return list(self.split["test"])


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Cohort:
    """Template + 4 pool cases + 2 test cases of the real data, or the synthetic cohort."""
    folder = tmp_path_factory.mktemp("cohort")
    if real_data_available():
        full = json.loads((DATA / "splits.json").read_text())
        split = {"template": full["template"], "unlabeled": full["unlabeled"][:4], "test": full["test"][:2]}
        split_file = folder / "splits.json"
        split_file.write_text(json.dumps(split))
        return Cohort(DATA, split, split_file, True)
    root = folder / "synthetic"
    split = helpers.make_cohort(root, n_unlabeled=4, n_test=2)
    return Cohort(root, split, root / "splits.json", False)


@pytest.fixture(scope="session")
def data_root(cohort) -> Path:
    """The cohort's dataset folder (real or synthetic)."""
    return cohort.root


@pytest.fixture(scope="session")
def split(cohort) -> dict:
    """The cohort's split: {'template', 'unlabeled', 'test'}."""
    return cohort.split
