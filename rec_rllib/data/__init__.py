"""Canonical log datasets: fetching real sources, validating, splitting, storing (Parquet + manifest)."""

from rec_rllib.data.dataset import EvalCases, LogDataset, build_dataset
from rec_rllib.data.sources import ColumnMapping, load_custom, load_movielens, load_obd
from rec_rllib.data.validate import DataValidationError

__all__ = [
    "ColumnMapping",
    "DataValidationError",
    "EvalCases",
    "LogDataset",
    "build_dataset",
    "load_custom",
    "load_movielens",
    "load_obd",
]
