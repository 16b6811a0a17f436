"""The whole pipeline on a real multi-node Ray started with `ray start` (head + two workers on 127.0.0.1),
driven by `ray job submit` and `serve deploy` exactly as on a cluster; and a training job that resumes
from its checkpoint after the head was restarted."""

from __future__ import annotations

import csv
import json
import time

import httpx
import pytest
import yaml

from tests.conftest import REPO, RayNodes, free_port

pytestmark = pytest.mark.slow

TINY_FINETUNE = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--max-len", "30",
                 "--dropout", "0.1", "--epochs", "1", "--eval-every", "1", "--batch-size", "128",
                 "--lr", "3e-3", "--warmup-steps", "10", "--threads", "1"]  # fmt: skip
TINY_TRAIN = ["--num-envs-per-env-runner", "2", "--train-batch-size", "80", "--rollout-fragment-length", "20",
              "--window", "30"]  # fmt: skip


@pytest.fixture
def nodes():
    n = RayNodes(head_cpus=1)
    try:
        yield n
    finally:
        n.stop()


def test_pipeline_through_job_submit_and_serve_deploy_on_three_nodes(nodes, tmp_path):
    nodes.start_head()
    nodes.add_worker(num_cpus=1, resources={"env_runner": 1})
    nodes.add_worker(num_cpus=2, resources={"env_runner": 1, "learner": 1, "serve": 4})
    nodes.wait_for_nodes(3)
    data, runs = tmp_path / "data", tmp_path / "runs"
    env = {"env_vars": {"REC_RLLIB_DATA": str(data), "TOKENIZERS_PARALLELISM": "false"}}

    nodes.submit(["python", "-m", "jobs.prepare", "--dataset", "ml-100k"], runtime_env=env)
    assert (data / "ml-100k" / "manifest.json").exists()
    nodes.submit(["python", "-m", "jobs.finetune", "--dataset", "ml-100k", "--out", str(runs / "ft"), *TINY_FINETUNE],
                 runtime_env=env)  # fmt: skip
    assert (runs / "ft" / "model.safetensors").exists()
    nodes.submit(["python", "-m", "jobs.train", "--address", "auto", "--finetuned", str(runs / "ft"),
                  "--out", str(runs / "rl"), "--iterations", "2", "--num-env-runners", "2",
                  "--env-runner-resource", "env_runner=1", *TINY_TRAIN], runtime_env=env)  # fmt: skip
    assert (runs / "rl" / "checkpoint").is_dir()
    nodes.submit(["python", "-m", "jobs.evaluate", "--models", "popularity", str(runs / "ft"),
                  str(runs / "rl" / "checkpoint"), "--out", str(runs / "eval")], runtime_env=env)  # fmt: skip
    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    assert len(metrics) == 3 and all(m["HR@10"] > 0 for m in metrics.values())

    port = free_port()
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(model=str(runs / "rl" / "checkpoint"), dataset=str(data / "ml-100k"),
                       feedback_dir=str(runs / "feedback"))  # fmt: skip
    app["runtime_env"] = env
    for d in app["deployments"]:
        d["ray_actor_options"]["num_cpus"] = 0.25
        if d["name"] == "PolicyScorer":
            d["ray_actor_options"]["resources"] = {"serve": 1}  # lands on the worker that offers `serve`
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        deploy = nodes.cli_serve(
            ["deploy", str(path), "--address", nodes.dashboard, "--working-dir", str(REPO)]
        )
        assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            try:
                r = httpx.post(f"{url}/recommend", json={"user": "196", "k": 5}, timeout=30)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the deployed app never answered"
            time.sleep(3)
        body = r.json()
        assert len(body["items"]) == 5 and body["model_version"].startswith("rl-")
    finally:
        nodes.cli_serve(["shutdown", "-y", "--address", nodes.dashboard])


def test_training_resumes_from_its_checkpoint_after_the_head_restarts(tmp_path, finetuned_run, ml_dir):
    out = tmp_path / "rl"
    train = ["python", "-m", "jobs.train", "--address", "auto", "--finetuned", finetuned_run, "--dataset", ml_dir,
             "--out", str(out), "--num-env-runners", "1", "--checkpoint-every", "1", *TINY_TRAIN]  # fmt: skip
    first = RayNodes(head_cpus=2)
    try:
        first.start_head()
        first.submit([*train, "--iterations", "2"])
    finally:
        first.stop()  # the head goes away between the jobs
    assert (out / "checkpoint").is_dir()
    second = RayNodes(head_cpus=2)
    try:
        second.start_head()
        log = second.submit([*train, "--iterations", "4", "--resume", str(out / "checkpoint")])
    finally:
        second.stop()
    assert "resumed from" in log
    with open(out / "train_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["iteration"])) for r in rows] == [1, 2, 3, 4]
