"""Serving operations on a real Ray: fractional GPUs, autoscaling under load, a model roll under load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve

from jobs.serve import APP_NAME, start, stop
from serving.app import build_app

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_states(deployment: str = "PolicyScorer") -> dict[str, int]:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return {str(k): int(v) for k, v in status.replica_states.items()}


@pytest.fixture
def gpu_ray():
    """Ray with one *logical* GPU: Ray schedules fractional-GPU replicas; torch falls back to the CPU."""
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    try:
        stop()
    finally:
        ray.shutdown()


def test_four_quarter_gpu_replicas_run_and_a_fifth_waits(gpu_ray, finetuned_run, ml_dir, tmp_path):
    from ray.serve.api import _run  # serve.run would wait for the fifth replica forever

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": finetuned_run,
        "dataset": ml_dir,
        "feedback_dir": str(tmp_path / "fb"),
        "scorer_replicas": 5,
        "scorer_gpus": 0.25,
        "scorer_cpus": 0.25,
    }
    _run(build_app(args), name=APP_NAME, route_prefix="/", _blocking=False)
    deadline = time.time() + 240
    while time.time() < deadline:
        states = _replica_states()
        if states.get("RUNNING", 0) == 4:
            break
        time.sleep(2)
    time.sleep(5)  # the fifth stays unplaced: the GPU is fully allocated
    states = _replica_states()
    assert states.get("RUNNING", 0) == 4 and sum(states.values()) == 5, states
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        seen = {}
        for _ in range(40):
            h = c.get("/healthz").json()
            seen[h["model_version"] + str(h["gpu_ids"])] = h
            r = c.post("/recommend", json={"user": "196", "k": 5})
            assert r.status_code == 200, r.text
        devices = {h["device"] for h in seen.values()}
        assert devices == {"cpu"}  # a logical GPU: CUDA is absent, the replica runs on its CPU fallback
        assert all(len(h["gpu_ids"]) == 1 for h in seen.values())  # yet Ray assigned each one a GPU share


def test_autoscaling_up_under_load_and_back_down(finetuned_run, ml_dir, tmp_path):
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        url = start(
            {
                "model": finetuned_run,
                "dataset": ml_dir,
                "feedback_dir": str(tmp_path / "fb"),
                "scorer_cpus": 0.5,
                "max_batch_size": 1,  # one request at a time per replica: queueing shows up as ongoing requests
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 5,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            },
            _free_port(),
        )
        assert _replica_states().get("RUNNING") == 1
        stop_load = threading.Event()
        errors: list[str] = []

        def client() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop_load.is_set():
                    r = c.post("/recommend", json={"user": "196", "k": 10})
                    if r.status_code != 200:
                        errors.append(r.text)

        peak = 1
        with ThreadPoolExecutor(6) as pool:  # bounded: 6 loopback clients, at most 240 s
            for _ in range(6):
                pool.submit(client)
            deadline = time.time() + 240
            while time.time() < deadline and peak < 2:
                peak = max(peak, _replica_states().get("RUNNING", 0))
                print(f"autoscaling: {_replica_states()}", flush=True)
                time.sleep(2)
            stop_load.set()
        assert peak >= 2 and not errors
        deadline = time.time() + 120
        while time.time() < deadline and _replica_states().get("RUNNING", 0) > 1:
            time.sleep(2)
        assert _replica_states().get("RUNNING") == 1  # back down after the load
    finally:
        try:
            stop()
        finally:
            ray.shutdown()


def test_model_roll_under_load_drops_no_request(finetuned_run, ml_dir, tmp_path):
    """A new model path through user_config: replicas reconfigure one by one; every request succeeds."""
    import torch

    from rec_rllib.models.run import load_run, save_run

    second = tmp_path / "finetuned-v2"
    model, meta = load_run(finetuned_run)
    with torch.no_grad():
        model.bias += 0.01  # a genuinely different model file: a new version id
    save_run(second, model, meta)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        args = {
            "model": finetuned_run,
            "dataset": ml_dir,
            "feedback_dir": str(tmp_path / "fb"),
            "scorer_replicas": 2,
            "scorer_cpus": 0.5,
        }
        url = start(args, _free_port())
        versions: list[str] = []
        failures: list[str] = []
        stop_load = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop_load.is_set():
                    try:
                        r = c.post("/recommend", json={"user": "196", "k": 5})
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
                        continue
                    if r.status_code == 200:
                        versions.append(r.json()["model_version"])
                    else:
                        failures.append(r.text)

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client)
            time.sleep(3)
            serve.run(build_app({**args, "model": str(second)}), name=APP_NAME, route_prefix="/")
            time.sleep(3)
            stop_load.set()
        assert not failures, failures[:3]
        assert len(set(versions)) == 2 and versions[-1].startswith("finetuned-v2")
    finally:
        try:
            stop()
        finally:
            ray.shutdown()
