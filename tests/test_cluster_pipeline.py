"""The whole pipeline on a real multi-node Ray started with `ray start` (head + two workers on 127.0.0.1),
driven by `ray job submit` and `serve deploy` exactly as on a cluster; and a training job that resumes
from its checkpoint after the head was restarted."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import REPO, RayNodes

pytestmark = pytest.mark.slow

TINY_FINETUNE = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--max-len", "30",
                 "--dropout", "0.1", "--epochs", "1", "--eval-every", "1", "--batch-size", "128",
                 "--lr", "3e-3", "--warmup-steps", "10", "--threads", "1"]  # fmt: skip
TINY_TRAIN = ["--num-envs-per-env-runner", "2", "--train-batch-size", "80", "--rollout-fragment-length", "20",
              "--window", "30"]  # fmt: skip


def test_pipeline_script_on_three_nodes(tmp_path):
    """`bash cluster/local-multinode.sh` (the README's multi-node recipe) with a tiny budget: head + two
    workers, four `ray job submit` jobs, `serve deploy`, an HTTP answer; it stops what it started."""
    import os
    import subprocess
    import sys

    out = tmp_path / "mn"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FINETUNE_ARGS=" ".join(TINY_FINETUNE),
               TRAIN_ARGS=" ".join(["--iterations", "2", *TINY_TRAIN]))  # fmt: skip
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", "cluster/local-multinode.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert (out / "data" / "ml-100k" / "manifest.json").exists() and (
        out / "ft" / "model.safetensors"
    ).exists()
    assert (out / "rl" / "checkpoint").is_dir()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(metrics) == 3 and all(m["HR@10"] > 0 for m in metrics.values())
    answer = json.loads((out / "answer.json").read_text())
    assert len(answer["items"]) == 5 and answer["model_version"].startswith("rl-")
    assert all(0 < it["propensity"] <= 1 for it in answer["items"])
    assert proc.stdout.count("succeeded") >= 4 and "multi-node pipeline done" in proc.stdout


def test_training_resumes_from_its_checkpoint_after_the_head_restarts(tmp_path, finetuned_run, ml_dir):
    """`ray start --head` on 127.0.0.1 and `ray job submit` of jobs.train exactly as a user types them; the
    head is stopped (only the processes the test started), a new head started, and a second job resumes
    from the first one's checkpoint."""
    out = tmp_path / "rl"
    train = ["python", "-m", "jobs.train", "--address", "auto", "--finetuned", finetuned_run, "--dataset", ml_dir,
             "--out", str(out), "--num-env-runners", "1", "--checkpoint-every", "1", *TINY_TRAIN]  # fmt: skip
    first = RayNodes(head_cpus=2)
    try:
        first.start_head()
        first.submit([*train, "--iterations", "2"])
    finally:
        first.stop()  # the head goes away between the jobs
    assert (out / "checkpoint").is_dir() and (out / "train_metrics.csv").exists()
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
