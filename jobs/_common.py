"""Helpers shared by the job entry points (logging, config files, the Ray session)."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from rec_rllib import fsutil


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    fsutil.write_json(path, asdict(payload) if is_dataclass(payload) else payload)


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None, num_gpus: float | None = None):
    """Connect to the Ray at ``address`` ('auto' on a cluster), or start an embedded local Ray (a fresh
    one, even when a stale head left ``ray_current_cluster`` behind); afterwards the embedded Ray is shut
    down, a cluster's only disconnected from (its references to objects dropped), so a second session in
    the same process starts clean."""
    import ray

    if address is None:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check_outlives_job(path: str | Path | None, flag: str) -> None:
    """Refuse a relative output path inside a Ray job: a job runs in Ray's temporary copy of its
    ``--working-dir`` (``.../runtime_resources/working_dir_files/...``), which Ray deletes when it stops, so
    what a relative path puts there is lost."""
    if path is None or "://" in str(path) or Path(path).is_absolute():
        return
    cwd = Path.cwd()
    if "working_dir_files" in cwd.parts:
        fail(
            f"{flag} {path} is relative, and this job runs in Ray's temporary copy of --working-dir ({cwd}), "
            f"which Ray deletes when it stops: give {flag} an absolute path that outlives the job, on "
            "storage "
            f"every node reaches (e.g. {flag} /shared/runs/{Path(path).name})"
        )
