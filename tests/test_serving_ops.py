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
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _replica_states(deployment: str = "PolicyScorer") -> dict[str, int]:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return {str(k): int(v) for k, v in status.replica_states.items()}


def _alive_replicas(deployment: str) -> dict[int, str]:
    """Pid -> replica id (what answers carry in ``served_by``) of the deployment's live replica processes,
    from the GCS (no dashboard needed; actor names are ``SERVE_REPLICA::<app>#<deployment>#<replica id>``)."""
    from ray._private.state import actors

    return {
        a["Pid"]: a["Name"].rsplit("#", 1)[-1]
        for a in actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"] == f"ServeReplica:{APP_NAME}:{deployment}"
    }


def _alive_replica_pids(deployment: str) -> set[int]:
    return set(_alive_replicas(deployment))


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

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": finetuned_run,
        "dataset": ml_dir,
        "feedback_dir": str(tmp_path / "fb"),
        "topology": "split",  # scorer replicas apart from the HTTP layer, each on a quarter GPU
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
                "topology": "split",  # the scorer deployment scales apart from the HTTP layer
                "scorer_cpus": 0.5,
                # one request at a time per replica: queueing shows up as ongoing requests
                "max_batch_size": 1,
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
            free_port(),
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
    """A new model path through user_config: the running replicas reconfigure in place (the same replicas
    answer before and after: no new replica, no new port); every request succeeds."""
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
        url = start(args, free_port())
        versions: list[str] = []
        replicas: list[str] = []
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
                        replicas.append(r.json()["served_by"]["ingress"])
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
        before = {r for r, v in zip(replicas, versions, strict=True) if v == versions[0]}
        after = {r for r, v in zip(replicas, versions, strict=True) if v == versions[-1]}
        assert after <= before and len(before) == 2, (before, after)
    finally:
        try:
            stop()
        finally:
            ray.shutdown()


def test_killed_replica_under_load_fails_over_and_loses_no_acknowledged_feedback(
    finetuned_run, ml_dir, tmp_path
):
    """Bounded load of /recommend + /feedback pairs on two ingress replicas; one replica process is killed
    (SIGKILL, its buffer never flushed). Clients retry failed calls (at most 5 tries); Serve restarts the
    replica; every acknowledged feedback event is in the log afterwards (journals recovered).

    The one failure allowed: feedback on an answer the killed replica gave just before it died, whose
    impression had not reached the shared store (answers do not wait for the store:
    docs/serving.md) — a 404 "unknown or expired", at most one per client (each has one answer in flight)."""
    import os
    import signal

    from serving.feedback import read_feedback

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    feedback_dir = tmp_path / "fb"
    try:
        url = start(
            {
                "model": finetuned_run,
                "dataset": ml_dir,
                "feedback_dir": str(feedback_dir),
                "ingress_replicas": 2,
                "topology": "split",
                "scorer_cpus": 0.5,
                "flush_rows": 100_000,
                "flush_seconds": 3600,
            },
            free_port(),
        )
        acked: list[str] = []
        ingress_seen: set[str] = set()  # ingress replica ids that answered
        failed: list[str] = []
        retries = [0]
        stop_load = threading.Event()

        def call(c: httpx.Client, path: str, body: dict, answered_by: str = "") -> dict | None:
            for attempt in range(5):
                try:
                    r = c.post(path, json=body)
                    if r.status_code == 200:
                        return r.json()
                    error = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    error = repr(e)
                retries[0] += 1
                time.sleep(0.2 * (attempt + 1))
            failed.append(f"{path}: {error}" + (f" (answered by {answered_by})" if answered_by else ""))
            return None

        def client(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop_load.is_set():
                    rec = call(c, "/recommend", {"user": str(1 + worker), "k": 5})
                    if rec is None:
                        continue
                    body = {
                        "request_id": rec["request_id"],
                        "item_id": rec["items"][0]["item_id"],
                        "reward": 1.0,
                    }
                    ingress_seen.add(rec["served_by"]["ingress"])
                    if call(c, "/feedback", body, rec["served_by"]["ingress"]) is not None:
                        acked.append(rec["request_id"])

        with ThreadPoolExecutor(4) as pool:
            for w in range(4):
                pool.submit(client, w)
            try:
                time.sleep(4)
                alive = _alive_replicas("RecIngress")
                replicas = sorted(alive)
                assert len(replicas) == 2, replicas
                killed_id = alive[replicas[0]]
                os.kill(replicas[0], signal.SIGKILL)  # a replica of the app this test started
                acked_at_kill = len(acked)
                deadline = time.time() + 90
                # replaced: a new replica process is alive and Serve counts two running (right after the
                # kill it may still count the dead one as running until its health check fails)
                while time.time() < deadline and not (
                    len(_alive_replica_pids("RecIngress") - {replicas[0]}) == 2
                    and _replica_states("RecIngress").get("RUNNING", 0) == 2
                ):
                    time.sleep(1)
                time.sleep(3)
            finally:
                stop_load.set()
        assert _replica_states("RecIngress").get("RUNNING", 0) == 2  # Serve replaced the replica
    finally:
        try:
            stop()  # a clean stop flushes the surviving replicas
        finally:
            ray.shutdown()
    logged = set(read_feedback(feedback_dir).column("request_id").to_pylist())
    missing = set(acked) - logged
    print(
        f"acknowledged {len(acked)} ({acked_at_kill} before the kill), retried calls {retries[0]}, "
        f"failed after retries {len(failed)}, missing from the log {len(missing)}"
    )
    lost_with_replica = [
        f
        for f in failed
        if f.startswith("/feedback: 404")
        and "unknown or expired" in f
        and f.endswith(f"(answered by {killed_id})")
    ]
    assert killed_id in ingress_seen, (killed_id, ingress_seen)  # the ids match what answers carry
    assert len(lost_with_replica) <= 4 and len(failed) == len(lost_with_replica), failed[:3]
    assert len(acked) > acked_at_kill > 0
    assert not missing
    assert list(feedback_dir.glob("part-*-recovered-*.parquet"))  # the killed replica's journal, recovered


def test_low_latency_setup_answers_on_the_replicas_own_port(finetuned_run, ml_dir, tmp_path):
    """`jobs.serve` with its low-latency defaults spelled out (direct ingress, single topology, no batch wait,
    request code on the replica's loop), as a user runs it: the replica answers HTTP on --port itself (Serve's
    proxy on --port + 100), which the command prints; a click sent
    there changes the next answer; the exposure slot (--exposure-slots 1) gives the last position of a
    repeated slate to an item not shown yet once the replica's exposure prices move (every --exposure-refresh
    answers; the same list in between); Ctrl-C stops it and the feedback is on disk."""
    import os
    import signal
    import subprocess
    import sys

    from jobs.serve import urls_in_output
    from serving.feedback import read_feedback
    from tests.conftest import REPO, free_port, stop_group

    def ids(answer):
        return [it["item_id"] for it in answer["items"]]

    port = free_port()
    env = dict(os.environ, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
    cmd = [
        sys.executable,
        "-m",
        "jobs.serve",
        "--model",
        finetuned_run,
        "--dataset",
        ml_dir,
        "--port",
        str(port),
        *"--num-cpus 2 --topology single --batch-wait-timeout-s 0 --same-thread --direct-ingress".split(),
        *"--no-access-log --feedback-dir".split(),
        str(tmp_path / "fb"),
        "--exposure-slots",
        "1",
        "--exposure-refresh",
        "2",
    ]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = None
        deadline = time.time() + 240
        while url is None and time.time() < deadline and proc.poll() is None:
            url = next(iter(urls_in_output(log.read_text())), None)
            time.sleep(1)
        assert url, log.read_text()[-3000:]
        assert url == f"http://127.0.0.1:{port}"  # the replica answers on --port itself
        assert httpx.get(f"http://127.0.0.1:{port + 100}/healthz", timeout=30).status_code == 200  # the proxy
        with httpx.Client(base_url=url, timeout=30) as c:
            first = c.post("/recommend", json={"user": "196", "k": 5}).json()
            clicked = first["items"][0]["item_id"]
            r = c.post("/feedback", json={"request_id": first["request_id"], "item_id": clicked, "reward": 1})
            assert r.status_code == 200, r.text
            again = c.post("/recommend", json={"user": "196", "k": 5}).json()
            assert clicked not in [it["item_id"] for it in again["items"]]
            health = c.get("/healthz").json()
            assert health["live_state"]["mirror_trusted"]
            # the same slate asked again within one exposure epoch (prices move every 2 answers here): the
            # same list; in the next epoch positions 1-4 stay and the 5th goes to an item not shown before it
            body = {"history": [first["items"][1]["item_id"]], "k": 5}
            asked = [c.post("/recommend", json=body).json() for _ in range(3)]
            pairs = [
                (x, y)
                for x, y in zip(asked, asked[1:], strict=False)
                if x["exposure_epoch"] == y["exposure_epoch"]
            ]
            assert pairs and all(ids(x) == ids(y) for x, y in pairs)
            a = asked[-1]
            b = c.post("/recommend", json=body).json()
            while b["exposure_epoch"] == a["exposure_epoch"]:
                b = c.post("/recommend", json=body).json()
            assert ids(b)[:4] == ids(a)[:4] and ids(b)[4] not in ids(a)
            b = b["items"]
            assert b[4]["exposure"] and b[4]["propensity"] == 1.0 and not any(it["exposure"] for it in b[:4])
            assert b[4]["score"] <= b[3]["score"]
            # the rotation switched off for one request: the policy's own list, reproducible whatever the
            # epoch
            plain = [c.post("/recommend", json={**body, "exposure": False}).json() for _ in range(3)]
            assert all(p["exposure_epoch"] is None and ids(p) == ids(plain[0]) for p in plain)
            assert not any(it["exposure"] for it in plain[0]["items"])
            exposure = c.get("/healthz").json()["exposure"]
            assert exposure["slots"] == 1 and exposure["refresh"] == 2 and exposure["epoch"] >= 2
            assert exposure["swaps"] >= 1 + health["exposure"]["swaps"]
    finally:
        stop_group(proc, signal.SIGINT, timeout=120)  # Ctrl-C
    assert proc.returncode == 0, log.read_text()[-3000:]
    rows = read_feedback(tmp_path / "fb").to_pylist()
    assert [(r["request_id"], r["item_id"]) for r in rows] == [(first["request_id"], clicked)]
