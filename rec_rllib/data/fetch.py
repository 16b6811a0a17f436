"""Fetch the real datasets through pip, extract only their data files, and cache them.

The data ships inside public PyPI artifacts, so the package registry is the only network this needs:

* MovieLens-100K: the wheel of ``recbole==1.2.1`` at ``recbole/dataset_example/ml-100k/``.
* Open Bandit Dataset sample: the sdist of ``obp==0.5.7`` at ``obp/dataset/obd/`` (plus the production
  Thompson-sampling prior ``obp/policy/conf/prior_bts.yaml``).

Neither package is installed or imported: ``pip download --no-deps`` fetches the archive, and only the
data members are extracted. The cache lives in ``$REC_RLLIB_CACHE`` (default ``~/.cache/rec_rllib``);
a fetch writes into a temporary directory and renames it into place, so an interrupted fetch never
leaves a half-extracted cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "REC_RLLIB_CACHE"


@dataclass(frozen=True)
class PypiDataSource:
    """A data set shipped inside a PyPI artifact."""

    name: str
    """Cache sub-directory and human name."""
    requirement: str
    """``pip download`` requirement, pinned (``package==version``)."""
    members: tuple[str, ...]
    """Path prefixes inside the archive to extract (the archive's top folder stripped for sdists)."""
    sdist: bool = False
    """Fetch the source distribution (``--no-binary=:all:``) instead of a wheel."""


ML100K = PypiDataSource(
    name="ml-100k",
    requirement="recbole==1.2.1",
    members=("recbole/dataset_example/ml-100k/",),
)
OBD = PypiDataSource(
    name="obd",
    requirement="obp==0.5.7",
    members=("obp/dataset/obd/", "obp/policy/conf/prior_bts.yaml"),
    sdist=True,
)


def cache_dir() -> Path:
    """The root of the download cache (``$REC_RLLIB_CACHE`` or ``~/.cache/rec_rllib``)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rec_rllib"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(source: PypiDataSource, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    if source.sdist:
        cmd += ["--no-binary=:all:", "--ignore-requires-python"]
    else:
        cmd += ["--only-binary=:all:"]
    cmd.append(source.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not fetch {source.requirement} from the package index for data set {source.name!r} "
            f"(`{' '.join(cmd)}` exited {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
            "Check that pip can reach the package index, or point the adapter at a local copy of the data."
        )
    archives = sorted(p for p in dest.iterdir() if p.is_file())
    if len(archives) != 1:
        raise RuntimeError(f"expected one archive from `{' '.join(cmd)}`, got {[p.name for p in archives]}")
    return archives[0]


def _extract(archive: Path, members: tuple[str, ...], out: Path) -> list[str]:
    """Extract the archive members under ``members`` into ``out``; return their relative paths."""
    written: list[str] = []

    def wanted(rel: str) -> bool:
        return any(rel.startswith(m) for m in members)

    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not wanted(info.filename):
                    continue
                target = out / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(info.filename)
    else:
        with tarfile.open(archive) as tf:
            for info in tf.getmembers():
                if not info.isfile():
                    continue
                # sdists hold everything under "<name>-<version>/"; strip that folder.
                rel = info.name.split("/", 1)[1] if "/" in info.name else info.name
                if not wanted(rel) or ".." in Path(rel).parts:
                    continue
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(info)
                assert src is not None  # a regular file member always has a payload
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(rel)
    if not written:
        raise RuntimeError(f"{archive.name} holds nothing under {members}; is the pinned release right?")
    return sorted(written)


def fetch(source: PypiDataSource, *, refresh: bool = False) -> Path:
    """Return the cache directory holding ``source``'s data files, downloading them on first use.

    The returned directory contains the archive's paths (e.g. ``recbole/dataset_example/ml-100k/...``)
    and ``FETCHED.json`` with the archive's name and SHA-256.
    """
    final = cache_dir() / source.name / source.requirement.replace("==", "-")
    marker = final / "FETCHED.json"
    if marker.exists() and not refresh:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        archive = _pip_download(source, tmp_path / "archive")
        staged = tmp_path / "data"
        files = _extract(archive, source.members, staged)
        (staged / "FETCHED.json").write_text(
            json.dumps(
                {
                    "requirement": source.requirement,
                    "archive": archive.name,
                    "archive_sha256": _sha256(archive),
                    "files": files,
                },
                indent=2,
            )
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
    return final


def ml100k_dir(*, refresh: bool = False) -> Path:
    """Directory with ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user`` (RecBole's atomic files)."""
    return fetch(ML100K, refresh=refresh) / "recbole" / "dataset_example" / "ml-100k"


def obd_dir(*, refresh: bool = False) -> Path:
    """Directory with ``{random,bts}/{all,men,women}/`` of the Open Bandit Dataset sample."""
    return fetch(OBD, refresh=refresh) / "obp" / "dataset" / "obd"


def obd_prior_path(*, refresh: bool = False) -> Path:
    """The production Bernoulli-TS prior (``prior_bts.yaml``: alpha/beta per item and campaign)."""
    return fetch(OBD, refresh=refresh) / "obp" / "policy" / "conf" / "prior_bts.yaml"
